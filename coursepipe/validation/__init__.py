"""Great Expectations suites generated from a recipe's schema, committed under gx/."""
