"""`coursepipe serve`: every exported model behind one web app (pages + JSON API), run by
uvicorn or as a Ray Serve deployment, from export/<recipe>/ folders alone (no training code)."""
