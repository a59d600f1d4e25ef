"""The figures both twins draw, from plain NumPy arrays (never TensorFlow).

One module for both twins, so a Keras figure and a NumPy figure look the same
and can be compared side by side. Figures are written to files; no display is
needed.
"""

import matplotlib

matplotlib.use("Agg")                      # draw to files, no window
import matplotlib.pyplot as plt            # noqa: E402
import numpy as np                         # noqa: E402

from helpers.common import atomic_write    # noqa: E402


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
        ax.imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=1)
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
    fig.suptitle(f"{title}: {len(wrong)} of the test set's mistakes (in red), then its first "
                 f"{len(right)} right answers\n(each image as the network sees it: bright ink "
                 "on black)", fontsize=10)
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


def filters_figure(kernel, title, path):
    """The first conv layer's filters, kernel (3, 3, 1, F), one small image each.

    Blue weights pull the filter's output down, red push it up; a filter
    with red above blue responds to the top edge of a stroke, and so on.
    Each filter gets its own colour scale, so that faint ones show too.
    """
    F = kernel.shape[-1]
    cols = 8
    rows = int(np.ceil(F / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.2))
    for f, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if f < F:
            limit = np.abs(kernel[:, :, 0, f]).max() or 1.0
            ax.imshow(kernel[:, :, 0, f], cmap="bwr", vmin=-limit, vmax=limit)
            ax.set_title(str(f), fontsize=7)
    fig.suptitle(f"{title}: first-layer filters (3x3; red +, blue -)")
    _save(fig, path)


def feature_maps_figure(image, activations, title, path, channels=12):
    """One test image and what each conv/pool layer makes of it.

    activations: [(layer name, array (H, W, C)), ...]. Shows the first
    `channels` channels of each layer, one row per layer.
    """
    fig, axes = plt.subplots(len(activations), channels + 1,
                             figsize=((channels + 1) * 0.9, len(activations) * 1.05))
    for row, (name, maps) in zip(axes, activations):
        for ax in row:
            ax.axis("off")
        row[0].imshow(image.squeeze(), cmap="gray")
        row[0].set_title("input" if name == activations[0][0] else "", fontsize=7)
        row[1].set_title(f"{name} {maps.shape[0]}x{maps.shape[1]}x{maps.shape[2]}",
                         fontsize=7, loc="left")
        for c, ax in enumerate(row[1:]):
            ax.imshow(maps[:, :, c], cmap="viridis")
    fig.suptitle(f"{title}: feature maps of one test image (first {channels} channels; "
                 "the input as the network sees it)")
    _save(fig, path)


def confident_mistakes_figure(images, labels, probs, class_names, title, path, n=16):
    """The test images the model gets wrong with the highest confidence."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:n]
    cols = 8
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.9), squeeze=False)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), wrong):
        ax.imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{class_names[predicted[i]]} {100 * probs[i, predicted[i]]:.0f}%\n"
                     f"true: {class_names[labels[i]]}", fontsize=8, color="red")
    if not len(wrong):
        np.ravel(axes)[0].set_title("no mistakes", fontsize=9)
    fig.suptitle(f"{title}: the most confident mistakes (as the network sees them: bright "
                 "ink on black)")
    _save(fig, path)


def own_images_figure(inputs, names, probs, class_names, title, path):
    """Each prepared input (as the network sees it) beside its probabilities."""
    rows = len(inputs)
    fig, axes = plt.subplots(rows, 2, figsize=(7, 1.7 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.5]})
    for (ax_img, ax_bar), image, name, p in zip(axes, inputs, names, probs):
        ax_img.imshow(image.squeeze(), cmap="gray", vmin=0, vmax=1)
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        ax_img.set_title(name.split("/")[-1], fontsize=8)
        colours = ["tab:red" if k == p.argmax() else "tab:gray" for k in range(len(p))]
        ax_bar.bar(range(len(p)), p, color=colours)
        ax_bar.set_xticks(range(len(p)), class_names, fontsize=7,
                          rotation=45 if max(map(len, class_names)) > 2 else 0)
        ax_bar.set_ylim(0, 1)
        ax_bar.set_ylabel("probability", fontsize=8)
    fig.suptitle(f"{title}: your images, as the network sees them (bright ink on black, "
                 "28 x 28)")
    fig.tight_layout()
    _save(fig, path)


def all_figures(prefix, out, history, x_test, y_test, probs, class_names, title,
                kernel1, activations):
    """Draw every figure for one run; return the paths written.

    kernel1: the first conv layer's kernel; activations: the feature maps of
    x_test[0], [(layer name, (H, W, C)), ...], computed by the twin itself.
    """
    paths = []
    if history["loss"]:
        paths.append(out / f"{prefix}_curves.png")
        training_curves(history, title, paths[-1])
    paths.append(out / f"{prefix}_predictions.png")
    prediction_grid(x_test, y_test, probs, class_names, title, paths[-1])
    paths.append(out / f"{prefix}_confusion.png")
    confusion_figure(y_test, probs, class_names, title, paths[-1])
    paths.append(out / f"{prefix}_filters.png")
    filters_figure(kernel1, title, paths[-1])
    paths.append(out / f"{prefix}_feature_maps.png")
    feature_maps_figure(x_test[0], activations, title, paths[-1])
    paths.append(out / f"{prefix}_mistakes.png")
    confident_mistakes_figure(x_test, y_test, probs, class_names, title, paths[-1])
    return paths
