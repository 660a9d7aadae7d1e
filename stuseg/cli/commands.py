"""The ``stuseg`` command line: parse arguments, call the library, render the result.

No logic of its own (``stuseg.cli``'s modules register one group of commands each on the app of
``stuseg.cli.base``). Heavy imports (torch) happen inside the commands so ``--help`` is fast.
Progress bars are drawn only on a terminal, so logs and pipes get exactly the lines.
"""

from __future__ import annotations

import sys

from stuseg.cli import batch, models, predict, tools
from stuseg.cli.base import app, internal_error_line, say
from stuseg.cli.finetune import app as finetune_app

__all__ = ["app", "main"]


# Every command, in the order --help lists them.
COMMANDS = (
    ("predict", predict.predict_cmd),
    ("batch", batch.batch_cmd),
    ("statistics", tools.statistics_cmd),
    ("preview", tools.preview_cmd),
    ("export-labels", tools.export_labels_cmd),
    ("labels", tools.labels_cmd),
    ("download", models.download_cmd),
    ("weights", models.weights_cmd),
    ("import-weights", models.import_weights_cmd),
    ("models", models.models_cmd),
    ("import-model", models.import_model_cmd),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)
app.add_typer(finetune_app, name="finetune")


def main() -> None:
    from stuseg.inference.threads import limit_spin_waiting

    limit_spin_waiting()  # before torch loads: idle OpenMP threads soon sleep instead of spinning
    try:
        app()
    except Exception as exc:  # outside any command (the commands handle their own): still one line
        say(f"stuseg: error: {internal_error_line(exc)}")
        sys.exit(1)
