"""Kinds of task: one module each, one `Kind` subclass (coursepipe/contract.py) carrying what every
recipe of that kind shares, and the typed config sections it reads.

    tabular.py          TabularClassification   adult (lesson 4)
    collab.py           Collab                  movielens (lessons 4-5)
    language_model.py   LanguageModel           human_numbers (lesson 7)
    image.py            ImageClassification     mnist, pets, own_images (lessons 1, 2, 6, 7)
    points.py           PointRegression         head_pose (lesson 3)
    multi_label.py      MultiLabelClassification  planet (lesson 3)
    segmentation.py     Segmentation            camvid (lesson 3)
    text_classifier.py  TextClassification      imdb (lessons 3-4, ULMFiT; its LMs: language_model.py)

Heavy libraries (torch, GX) are imported inside methods: prepare and validate need neither.
"""
