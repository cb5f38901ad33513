"""`sa-t2i train`, then `evaluate` and `sample` on the checkpoint: the CLI works end to end (tiny pipeline)."""

from __future__ import annotations

import json

from t2i.cli import main


def test_cli_train_evaluate_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny_cpu", "--log.output_dir", str(run), "--train.num_epochs", "1"]) == 0
    assert (run / "checkpoints" / "latest").exists()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert records and all(k in records[-1] for k in ("reward_mean", "path_kl_mean"))
    # the run ends with a summary: final reward and path KL (as logged), and where the outputs are
    out = capsys.readouterr().out
    summary = json.load(open(run / "summary.json"))
    assert summary["reward_mean"] == records[-1]["reward_mean"] and summary["checkpoint"].endswith("checkpoint-000001")
    assert f"reward {records[-1]['reward_mean']:.4g}" in out and "path KL" in out and str(run / "metrics.jsonl") in out
    main(["evaluate", "--checkpoint", str(run)])
    out = capsys.readouterr().out
    assert "policy: reward" in out and "pretrained: reward" in out and "path KL" in out
    main(["sample", "--checkpoint", str(run), "--prompts", "a cat", "a dog", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "grid.png").exists() and len(list((tmp_path / "s").glob("0*.png"))) >= 2
