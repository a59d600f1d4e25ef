"""The figures both twins draw, from plain NumPy arrays (never TensorFlow).

One module for both twins, so a Keras figure and a NumPy figure look the same
and can be compared side by side. Figures are written to files; no display is
needed.
"""

import matplotlib

matplotlib.use("Agg")                      # draw to files, no window
import matplotlib.pyplot as plt            # noqa: E402
import numpy as np                         # noqa: E402

from common import atomic_write            # noqa: E402


def _save(fig, path):
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def training_curves(history, title, path):
    """Loss and accuracy per epoch, training and validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[key], "o-", label="training")
        ax.plot(epochs, history["val_" + key], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, path)


def prediction_grid(images, labels, probs, class_names, title, path, n=36):
    """The first n test images with the predicted class; wrong ones in red.

    Mistakes are rare, so the grid shows some of them first (if any), then
    correct ones, so that both kinds are on the page.
    """
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)[: n // 3]
    right = np.flatnonzero(predicted == labels)[: n - len(wrong)]
    order = np.concatenate([wrong, right]).astype(int)
    cols = 6
    rows = int(np.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), order):
        ax.imshow(images[i].squeeze(), cmap="gray_r", vmin=0, vmax=1)
        ok = predicted[i] == labels[i]
        text = f"{class_names[predicted[i]]} ({100 * probs[i].max():.0f}%)"
        if not ok:
            text += f"\ntrue: {class_names[labels[i]]}"
        ax.set_title(text, fontsize=8, color="black" if ok else "red")
        if not ok:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("red")
                spine.set_linewidth(2)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}: predictions (mistakes in red)")
    _save(fig, path)


def confusion_matrix(labels, predicted, k):
    """counts[i, j] = how many images of true class i were predicted as j."""
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def confusion_figure(labels, probs, class_names, title, path):
    counts = confusion_matrix(labels, probs.argmax(axis=1), len(class_names))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # Colour by log count so that the few mistakes are visible next to the
    # thousand-strong diagonal.
    im = ax.imshow(np.log1p(counts), cmap="Blues")
    k = len(class_names)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                dark = counts[i, j] > counts.max() / 3
                ax.text(j, i, counts[i, j], ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    ax.set_title(f"{title}: confusion matrix")
    _save(fig, path)


def all_figures(prefix, out, history, x_test, y_test, probs, class_names, title):
    """Draw every figure for one run; return the paths written."""
    paths = []
    if history["loss"]:
        paths.append(out / f"{prefix}_curves.png")
        training_curves(history, title, paths[-1])
    paths.append(out / f"{prefix}_predictions.png")
    prediction_grid(x_test, y_test, probs, class_names, title, paths[-1])
    paths.append(out / f"{prefix}_confusion.png")
    confusion_figure(y_test, probs, class_names, title, paths[-1])
    return paths
