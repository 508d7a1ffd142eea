"""Per-step training metrics in ``<run_dir>/train/metrics.jsonl``, and the loss curve drawn from them.

Rank 0 writes one JSON line per logged step (step, epoch, loss, lr, examples/s, tokens/s, seconds, source, kind).
A resumed run first drops the lines after the step it resumes from, so the file always describes one history, and
adds an event line ``{"event": "resumed", "step": N}``.
Local run directories are appended to line by line; object stores (which have no append) get the whole file
rewritten at every checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_e5 import storage
from ray_e5.rundir import CURVE_FILE, METRICS_FILE  # train/'s files are named with the rest of the layout


def read_metrics(train_dir: str) -> list[dict]:
    uri = storage.join(train_dir, METRICS_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, train_dir: str, resume_step: int = 0):
        self.uri = storage.join(train_dir, METRICS_FILE)
        self.local = storage.is_local(train_dir)
        kept = [m for m in read_metrics(train_dir) if m.get("step", 0) <= resume_step] if resume_step else []
        self.lines = [json.dumps(m) for m in kept]
        storage.write_text(self.uri, "".join(line + "\n" for line in self.lines))
        self._file = open(storage.resolve(self.uri)[1], "a", encoding="utf-8") if self.local else None

    def log(self, record: dict) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def flush(self) -> None:
        if self._file is None:
            storage.write_text(self.uri, "".join(line + "\n" for line in self.lines))

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def plot_loss_curve(train_dir: str, title: str = "") -> str | None:
    """Draw loss (and lr) per step to ``<train_dir>/loss.png``; returns its URI, or None without metrics."""
    metrics = [m for m in read_metrics(train_dir) if "loss" in m]  # events (a resume) carry no loss
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [m["loss"] for m in metrics], lw=0.8, color="tab:blue", alpha=0.5, label="loss")
    window = max(1, len(metrics) // 20)
    if window > 1:
        smooth = [sum(m["loss"] for m in metrics[max(0, i - window + 1):i + 1]) / len(metrics[max(0, i - window + 1):i + 1])
                  for i in range(len(metrics))]
        ax.plot(steps, smooth, lw=1.8, color="tab:blue", label=f"loss (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [m["lr"] for m in metrics], lw=1.0, color="tab:orange", label="lr")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title or "ray-e5 training")
    fig.tight_layout()
    uri = storage.join(train_dir, CURVE_FILE)
    if storage.is_local(uri):
        fig.savefig(Path(storage.resolve(uri)[1]))
    else:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        fs, path = storage.resolve(uri)
        with fs.open_output_stream(path) as out:
            out.write(buf.getvalue())
    plt.close(fig)
    return uri
