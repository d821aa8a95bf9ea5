"""Pictures of an evaluation that say what they show: samples, their nearest and second-nearest training
images, and each sample's NN ratio ||x - NN1|| / ||x - NN2|| written under its column; a copy (ratio below
eval.threshold) is framed in red, its ratio written in red."""
from __future__ import annotations

import numpy as np

from diffmem.data import TrainingSet, grid_array
from diffmem.evaluate import Evaluation, nn_grid_rows
from diffmem.memorization import is_copy

ROW_LABELS = ("sample", "NN1", "NN2")
RATIO_LABEL = "d1/d2"
COPY = (220, 0, 0)   # the frame and ratio of a copy


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:            # Pillow without FreeType sizes
        return ImageFont.load_default()


def nn_grid_picture(result: Evaluation, train_set: TrainingSet, n: int = 16) -> np.ndarray:
    """grid_array's sample | NN1 | NN2 rows, with row names on the left and a row of NN ratios below
    (a sample is a copy when its ratio is below eval.threshold, 1/3 in the paper). (H, W, 3) uint8."""
    from PIL import Image, ImageDraw
    rows = nn_grid_rows(result, train_set, n)
    grid = grid_array(rows)
    count = min(len(r) for r in rows)
    w = rows[0].shape[-1]
    scale = grid.shape[1] // (count * (w + 1) + 1)
    column = w * scale
    font = _font(max(8, min(14, column // 4)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(probe.textlength(t, font=font) for t in (*ROW_LABELS, RATIO_LABEL))) + 8
    caption = int(font.size * 1.6) if hasattr(font, "size") else 16
    picture = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0] + caption), "white")
    picture.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(picture)
    row_height = grid.shape[0] / len(rows)
    for i, label in enumerate(ROW_LABELS[:len(rows)]):
        draw.text((4, (i + 0.5) * row_height), label, fill="black", font=font, anchor="lm")
    draw.text((4, grid.shape[0] + caption / 2), RATIO_LABEL, fill="black", font=font, anchor="lm")
    ratios = result.nn_ratio[:count].tolist()
    for j, ratio in enumerate(ratios):
        text = f"{ratio:.3f}"
        if probe.textlength(text, font=font) > column:
            text = f"{ratio:.2f}"
        left = margin + (1 + j * (w + 1)) * scale
        copy = is_copy(ratio, result.threshold)
        if copy:   # the column's sample and its neighbours, in the 1-pixel padding around them
            draw.rectangle((left - scale, 0, left + column + scale - 1, grid.shape[0] - 1), outline=COPY,
                           width=max(1, scale))
        draw.text((left + column / 2, grid.shape[0] + caption / 2), text, fill=COPY if copy else "black", font=font,
                  anchor="mm")
    return np.asarray(picture)


def nn_ratio_markdown(result: Evaluation, n: int = 16) -> str:
    """The same ratios as a markdown table (TensorBoard's text tab), with the evaluation's memorization ratio."""
    ratios = result.nn_ratio[:n].tolist()
    head = "| column | " + " | ".join(str(j + 1) for j in range(len(ratios))) + " |"
    rule = "|---" * (len(ratios) + 1) + "|"
    body = "| d1/d2 | " + " | ".join(f"{r:.3f}" for r in ratios) + " |"
    return (f"NN ratio ||x - NN1|| / ||x - NN2|| of the samples in the picture (a copy when below "
            f"eval.threshold, 1/3 in the paper); memorization ratio over all {len(result.nn_ratio)} samples: "
            f"{result.ratio:.4f}\n\n{head}\n{rule}\n{body}")
