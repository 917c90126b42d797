"""The report layer's console output: the results table at 80 columns, and the ETA log of long builds."""
from __future__ import annotations

import logging

import pytest
from rich.console import Console

from fusion.report.tables import print_results, reference_label, results_table, wrap_header
from fusion.utils import EtaLog, duration

TASKS = ["mnist", "fashion", "animals", "cvdigits", "skdigits", "letters", "greek", "textures"]


def per_task(offset: float) -> dict[str, float]:
    return {t: round(offset + 0.01 * i, 4) for i, t in enumerate(TASKS)}


RESULTS = {"method": "concrete_adamerging_layer_wise", "modelpool": "mini8", "per_task": per_task(0.5),
           "reference": {"pretrained": {"per_task": per_task(0.3)}, "individual": {"per_task": per_task(0.9)},
                         "task_arithmetic": {"per_task": per_task(0.6), "hyperparameters": {"lam": 0.05}}}}


def rendered(results, width: int = 200) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(results_table(results))
    return console.export_text().splitlines()


def test_table_fits_80_columns_with_tasks_as_rows_and_models_as_columns(capsys):
    print_results(RESULTS)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in TASKS}
    assert list(rows) == TASKS
    # columns in order: zero-shot, task arithmetic at its tuned λ, the method, the experts
    assert rows["animals"] == ["32.0", "62.0", "52.0", "92.0"] and rows["textures"] == ["37.0", "67.0", "57.0", "97.0"]
    mean = next(line.split()[1:] for line in lines if line.split()[:1] == ["mean"])
    assert mean == ["33.5", "63.5", "53.5", "93.5"]
    header = "\n".join(lines[:8])
    assert all(part in header for part in ("zero-shot", "concrete_", "adamerging_", "layer_wise", "λ=0.05", "experts"))


def test_table_without_a_reference_shows_what_it_has():
    lines = rendered({**RESULTS, "method": "ties", "reference": {}})
    assert any(line.split()[:2] == ["mnist", "50.0"] and len(line.split()) == 2 for line in lines)


def test_a_task_id_method_says_so_in_the_title():
    title = " ".join(" ".join(rendered({**RESULTS, "method": "emr", "inference": "task id"}, width=80)[:3]).split())
    assert "task id at inference, not one model" in title
    assert "task id" not in " ".join(rendered(RESULTS)[:3])


def test_headers_wrap_after_underscores_and_spaces():
    assert wrap_header("concrete_adamerging_layer_wise") == "concrete_\nadamerging_\nlayer_wise"
    assert wrap_header("ties") == "ties" and wrap_header("task_arithmetic λ=0.05") == "task_\narithmetic\nλ=0.05"
    assert all(len(line) <= 14 for line in wrap_header("a_very_long_name_without_breaks_here").splitlines())
    assert reference_label("task_arithmetic", {"hyperparameters": {"lam": 0.05, "grid": [1]}}) == \
        "task_arithmetic λ=0.05"
    assert reference_label("pretrained", {}) == "zero-shot" and reference_label("individual", {}) == "experts"


def test_eta_log_extrapolates_the_average_rate(caplog):
    now = [100.0]
    eta = EtaLog(1000, "mini8 pool build", logging.getLogger("eta-test"), clock=lambda: now[0])
    now[0] += 60
    with caplog.at_level(logging.INFO, logger="eta-test"):
        line = eta.advance(400, "pretraining")
    assert line == "mini8 pool build: pretraining done (40%), elapsed 1m00s, ETA 1m30s"
    assert caplog.records[-1].getMessage() == line
    now[0] += 3600
    assert eta.advance(600, "expert mnist").endswith("done (100%), elapsed 1h01m, ETA 0s")
    assert duration(7.4) == "7s" and duration(59.6) == "1m00s"
    with pytest.raises(ValueError):
        EtaLog(0, "nothing")


def test_training_bar_names_the_stage_not_an_epoch():
    from fusion.train.progress import StepProgressBar

    assert StepProgressBar("concrete_adamerging_layer_wise/phase1")._get_train_description(0) == \
        "training concrete_adamerging_layer_wise/phase1"


def test_static_reference_rows_are_cached_per_pool_task_pool_and_config(tiny_pool, tiny_taskpool, tmp_path,
                                                                         monkeypatch):
    from functools import partial

    from fusion.evaluate import evaluate
    from fusion.merge.combine import task_arithmetic
    from fusion.methods.base import RunContext
    from fusion.methods.static import StaticMerge, merged_encoder
    from fusion.reference import reference_rows

    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "cache"))
    runs = []

    class Counted(StaticMerge):
        def run(self, *args):
            runs.append(self.fn.keywords["lam"])
            return super().run(*args)

    ctx, fingerprint = RunContext(output_dir=tmp_path), tiny_taskpool.fingerprint()
    rows = reference_rows(tiny_pool, tiny_taskpool, fingerprint, ctx,
                          {"ta": (Counted(partial(task_arithmetic, lam=0.5)), {"lam": 0.5})})
    want = evaluate(merged_encoder(tiny_pool, task_arithmetic(tiny_pool.task_vectors(), 0.5)), tiny_pool.heads,
                    tiny_taskpool, split="test")  # an independent merge and evaluation
    assert rows["ta"]["per_task"] == pytest.approx(want) and rows["ta"]["hyperparameters"] == {"lam": 0.5}
    assert set(rows) == {"pretrained", "individual", "ta"} and runs == [0.5]
    again = reference_rows(tiny_pool, tiny_taskpool, fingerprint, ctx,
                           {"ta": (Counted(partial(task_arithmetic, lam=0.5)), {"lam": 0.5})})
    assert again == rows and runs == [0.5]  # cached
    other = reference_rows(tiny_pool, tiny_taskpool, fingerprint, ctx,
                           {"ta": (Counted(partial(task_arithmetic, lam=0.1)), {"lam": 0.1})})
    assert runs == [0.5, 0.1] and other["ta"]["per_task"] != rows["ta"]["per_task"]  # another config: measured


def test_third_party_warnings_that_say_nothing_to_a_user_are_ignored_others_are_not():
    import warnings

    from fusion.utils import quiet_third_party

    def warn(message: str, module: str) -> None:
        warnings.warn_explicit(message, UserWarning, f"{module.replace('.', '/')}.py", 1, module=module)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", "pytorch_lightning.utilities._pytree")
        warn("Found 95 module(s) in eval mode at the start of training.", "pytorch_lightning.loops.fit_loop")
        warn("Found 95 module(s) in eval mode at the start of training.", "fusion.train.module")  # not Lightning's
        warn("The dataloader does not have many workers", "pytorch_lightning.trainer.connectors.data_connector")
    assert [str(w.message)[:20] for w in caught] == ["Found 95 module(s) i", "The dataloader does "]
