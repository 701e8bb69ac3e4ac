"""The evaluate stage for image classifiers: the shared classification report plus fastai's
ClassificationInterpretation pictures (most-confused pairs, top losses)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSED_CSV = "most_confused.csv"
TOP_LOSSES_PNG = "top_losses.png"


def evaluate_images(model, recipe, processor: dict, valid: pd.DataFrame, bs: int, plots: Path, cfg,
                    k: int) -> tuple[dict, Path]:
    """(metrics, confusion matrix PNG); writes the confusion CSVs and the top-losses grid too."""
    from coursepipe.io import write_bytes, write_text
    from coursepipe.learn import interpret
    from coursepipe.stages.evaluate import mean_loss, predict_logits
    from coursepipe.vision.interpret import most_confused, most_confused_csv, plot_top_losses, top_losses

    classes = list(processor["classes"])
    x, y = recipe.tensors(processor, valid)
    logits = predict_logits(model, (x,), bs)
    predicted, actual = logits.argmax(1).numpy(), y.numpy()
    metrics = interpret.classification_metrics(actual, predicted, classes)
    metrics["valid_loss"] = mean_loss(recipe.loss_func(), logits, y, bs)

    cm = interpret.confusion_matrix(actual, predicted, len(classes))
    write_bytes(plots / CONFUSION_PNG, interpret.plot_confusion(
        cm, classes, title=f"{cfg.name}: confusion matrix (n={len(actual)})"))
    write_text(plots / CONFUSION_CSV, interpret.confusion_csv(actual, predicted, classes))
    pairs = most_confused(cm, classes)
    write_text(plots / CONFUSED_CSV, most_confused_csv(pairs))

    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    prob_actual = torch.softmax(logits, 1)[torch.arange(len(y)), y].numpy()
    idx = top_losses(losses, k)
    titles = [f"{classes[predicted[i]]}/{classes[actual[i]]} / {losses[i]:.2f} / {prob_actual[i]:.2f}\n"
              f"{Path(valid['path'].iloc[i]).name}" for i in idx]
    write_bytes(plots / TOP_LOSSES_PNG, plot_top_losses(x[idx].numpy(), titles))
    return metrics, plots / CONFUSION_PNG
