"""adult (lesson 4): will this person earn >= $50k? A tabular classifier with entity embeddings.

Layout (fastai URLs.ADULT_SAMPLE): adult_sample/adult.csv, target `salary` in {<50k, >=50k}.
Course result: accuracy 0.82 (lesson 4); fastai 2.8.12 reaches 0.833 after one epoch here.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.data.csvfile import read_csv, to_number
from coursepipe.kinds.tabular import TabularClassification, TabularModel

CSV_MEMBER = "adult_sample/adult.csv"
TARGET = "salary"
CLASSES = ("<50k", ">=50k")

# Every column of the file, with the values UCI documents; the GX suite is generated from these.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "workclass": ("Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov",
                  "State-gov", "Without-pay", "Never-worked"),
    "education": ("Bachelors", "Some-college", "11th", "HS-grad", "Prof-school", "Assoc-acdm",
                  "Assoc-voc", "9th", "7th-8th", "12th", "Masters", "1st-4th", "10th", "Doctorate",
                  "5th-6th", "Preschool"),
    "marital-status": ("Married-civ-spouse", "Divorced", "Never-married", "Separated", "Widowed",
                       "Married-spouse-absent", "Married-AF-spouse"),
    "occupation": ("Tech-support", "Craft-repair", "Other-service", "Sales", "Exec-managerial",
                   "Prof-specialty", "Handlers-cleaners", "Machine-op-inspct", "Adm-clerical",
                   "Farming-fishing", "Transport-moving", "Priv-house-serv", "Protective-serv",
                   "Armed-Forces"),
    "relationship": ("Wife", "Own-child", "Husband", "Not-in-family", "Other-relative", "Unmarried"),
    "race": ("White", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other", "Black"),
    "sex": ("Female", "Male"),
    "native-country": ("United-States", "Cambodia", "England", "Puerto-Rico", "Canada", "Germany",
                       "Outlying-US(Guam-USVI-etc)", "India", "Japan", "Greece", "South", "China",
                       "Cuba", "Iran", "Honduras", "Philippines", "Italy", "Poland", "Jamaica",
                       "Vietnam", "Mexico", "Portugal", "Ireland", "France", "Dominican-Republic",
                       "Laos", "Ecuador", "Taiwan", "Haiti", "Columbia", "Hungary", "Guatemala",
                       "Nicaragua", "Scotland", "Thailand", "Yugoslavia", "El-Salvador",
                       "Trinadad&Tobago", "Peru", "Hong", "Holand-Netherlands"),
}
# Inclusive bounds a person can defend: UCI's observed ranges, widened to round numbers.
RANGES: dict[str, tuple[float, float]] = {
    "age": (16, 100), "fnlwgt": (1, 1_500_000), "education-num": (1, 16),
    "capital-gain": (0, 100_000), "capital-loss": (0, 5_000), "hours-per-week": (1, 99),
}
COLUMNS = ("age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
           "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
           "hours-per-week", "native-country", TARGET)


# ----------------------------------------------------------------------------- raw data

def read_raw(extracted: Path, p=None) -> pd.DataFrame:
    """Read adult.csv from an extracted archive and normalise both known variants.

    fastai's own file keeps UCI's leading spaces and `?` as a category; the cleaned UCI file has
    neither. Both become: stripped strings, missing as NaN, numbers as float.
    """
    path = extracted / CSV_MEMBER
    if not path.is_file():
        found = sorted(str(p.relative_to(extracted)) for p in extracted.rglob("*.csv"))[:5]
        raise FileNotFoundError(f"archive has no {CSV_MEMBER} (csv files found: {found or 'none'})")
    df = read_csv(path, CSV_MEMBER, skipinitialspace=True, na_values=["?"], keep_default_na=True)
    df.columns = [c.strip() for c in df.columns]
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].astype("string").str.strip().replace({"?": pd.NA, "": pd.NA})
        if col in RANGES:  # text in a number column is named here, not coerced to missing
            df[col] = to_number(df[col], col, CSV_MEMBER)
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Types the validation suite and training expect: category columns as str, numbers as float."""
    out = df.copy()
    for col in out.columns:
        if col in RANGES:
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64") \
                if not pd.api.types.is_numeric_dtype(out[col]) else out[col].astype("float64")
        else:
            out[col] = out[col].astype("object").where(out[col].notna(), None)
    return out


# ----------------------------------------------------------------------------- synthetic sample

def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC adult.csv in the fastai layout: real vocabularies, a known rule plus noise.

    salary is >=50k with probability sigmoid(score), where score grows with education, age (up
    to ~50), hours worked, capital gain and being married; about a quarter of rows are positive,
    as in the census data. A model that learns the rule scores ~0.85 accuracy.
    """
    rows = rows or 32_561
    rng = np.random.default_rng(seed)
    edu_names = ("Preschool", "1st-4th", "5th-6th", "7th-8th", "9th", "10th", "11th", "12th",
                 "HS-grad", "Some-college", "Assoc-voc", "Assoc-acdm", "Bachelors", "Masters",
                 "Prof-school", "Doctorate")  # education-num 1..16 in this order
    edu_num = np.clip(np.round(rng.normal(10, 2.5, rows)), 1, 16).astype(int)
    age = np.clip(np.round(rng.gamma(6.0, 6.5, rows) + 17), 17, 90).astype(int)
    hours = np.clip(np.round(rng.normal(40, 12, rows)), 1, 99).astype(int)
    gain = np.where(rng.random(rows) < 0.08, np.round(rng.exponential(8000, rows)), 0).astype(int)
    loss = np.where(rng.random(rows) < 0.05, np.round(rng.uniform(100, 4000, rows)), 0).astype(int)
    sex = rng.choice(CATEGORIES["sex"], rows, p=[0.33, 0.67])
    married = rng.random(rows) < 0.46
    marital = np.where(married, "Married-civ-spouse",
                       rng.choice(["Never-married", "Divorced", "Separated", "Widowed"], rows,
                                  p=[0.6, 0.25, 0.07, 0.08]))
    relationship = np.where(married, np.where(sex == "Male", "Husband", "Wife"),
                            rng.choice(["Not-in-family", "Own-child", "Unmarried", "Other-relative"], rows))
    occupation = rng.choice(CATEGORIES["occupation"], rows)
    exec_prof = np.isin(occupation, ["Exec-managerial", "Prof-specialty"])
    score = (0.45 * (edu_num - 10) + 0.06 * np.minimum(age - 38, 12) - 0.03 * np.maximum(age - 60, 0)
             + 0.03 * (hours - 40) + 2.2 * married + 1.0 * exec_prof + 0.0004 * gain - 2.6)
    salary = np.where(rng.random(rows) < 1 / (1 + np.exp(-2.0 * score)), ">=50k", "<50k")

    df = pd.DataFrame({
        "age": age,
        "workclass": rng.choice(CATEGORIES["workclass"][:6], rows, p=[0.74, 0.08, 0.04, 0.03, 0.07, 0.04]),
        "fnlwgt": np.round(rng.lognormal(12.0, 0.5, rows)).clip(13_000, 1_400_000).astype(int),
        "education": np.array(edu_names)[edu_num - 1],
        "education-num": edu_num,
        "marital-status": marital,
        "occupation": occupation,
        "relationship": relationship,
        "race": rng.choice(CATEGORIES["race"], rows, p=[0.85, 0.03, 0.01, 0.01, 0.10]),
        "sex": sex,
        "capital-gain": gain,
        "capital-loss": loss,
        "hours-per-week": hours,
        "native-country": rng.choice(["United-States", "Mexico", "Philippines", "Germany", "Canada"],
                                     rows, p=[0.92, 0.03, 0.02, 0.015, 0.015]),
        "salary": salary,
    }, columns=list(COLUMNS))
    # Missing values where UCI has them (workclass, occupation, native-country), as empty cells.
    for col, frac in (("workclass", 0.056), ("occupation", 0.057), ("native-country", 0.018)):
        df.loc[rng.random(rows) < frac, col] = None
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return deterministic_tgz({CSV_MEMBER: buf.getvalue().encode()})


# ----------------------------------------------------------------------------- the recipe

RECIPE = Recipe(
    name="adult",
    course=("accuracy", 0.82, "lesson 4, ADULT_SAMPLE"),
    kind=TabularClassification(),
    schema=Schema(columns=COLUMNS, target=TARGET, categories=CATEGORIES, ranges=RANGES, classes=CLASSES),
    model_config=TabularModel,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
)
