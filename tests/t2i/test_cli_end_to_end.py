"""`sa-t2i train`, then `evaluate` and `sample` on the checkpoint: the CLI works end to end (tiny pipeline)."""

from __future__ import annotations

import json

from t2i.cli import main


def test_cli_train_evaluate_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--config", "tiny_cpu", "--log.output_dir", str(run), "--train.num_epochs", "1"])
    assert (run / "checkpoints" / "latest").exists()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert records and all(k in records[-1] for k in ("reward_mean", "path_kl_mean"))
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(run)])
    out = capsys.readouterr().out
    assert "policy: reward" in out and "pretrained: reward" in out and "path KL" in out
    main(["sample", "--checkpoint", str(run), "--prompts", "a cat", "a dog", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "grid.png").exists() and len(list((tmp_path / "s").glob("0*.png"))) >= 2
