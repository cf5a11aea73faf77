"""The teacher cache: top-k KL against the exact KL, fill-once reuse, disk round trip, refusals."""

import json

import pytest
import torch

import gpconv
from gpconv import GPConvConfig, GPConvError, TeacherCache, TrainConfig, build_datasets, distill, shrink
from gpconv.recovery.losses import loss_sums, teacher_targets
from gpconv.hub import tiny_phi3
from gpconv.recovery.teacher_cache import CACHE_WEIGHTS
from gpconv.recovery.losses import TopKTargets, top_k_of

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    words = "apple pear plum fig kiwi lime date lemon".split()
    rows = [{"instruction": f"Name {words[i % 8]}", "response": " ".join([words[(i * 3) % 8]] * (1 + i % 4))} for i in range(40)]
    f = tmp_path_factory.mktemp("data") / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    tok = gpconv.hub.byte_tokenizer()
    tr, va = build_datasets(str(f), tok, block_size=32, val_size=6)
    return tr, va, tok


def _pair():
    teacher, _ = tiny_phi3(seed=1, **SMALL)
    student, _ = tiny_phi3(seed=1, **SMALL)
    shrink(student, GPConvConfig(min_channels_per_group=16, init="project"))
    return student, teacher


def _cfg(**kw):
    return TrainConfig(**{**dict(max_steps=6, batch_size=4, lr=3e-3, progress=False, log_every=1), **kw})


class ForwardCounter:
    """Counts the rows (blocks) a model's forward passes see."""

    def __init__(self, model):
        self.rows = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.rows += ids.shape[0]


def _kl_and_grad(student_logits, labels, target):
    x = student_logits.clone().requires_grad_(True)
    kl = loss_sums(x, labels, target).kl
    kl.backward()
    return kl.detach(), x.grad


def _topk_targets(t_logits, labels, k, temperature=1.0):
    from gpconv.recovery.losses import Positions

    idx, logq, rest = top_k_of(t_logits.reshape(-1, t_logits.shape[-1]), k, temperature)
    pos = Positions.of(labels)
    return TopKTargets(pos.rows(idx).long(), pos.rows(logq), pos.rows(rest), temperature, t_logits.shape[-1])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_is_exact_at_full_vocabulary_and_a_lower_bound_below(masked, temperature):
    torch.manual_seed(0)
    B, T, V = 2, 6, 13
    labels = torch.randint(0, V, (B, T))
    if masked:
        labels[:, :4] = -100  # response-only: the sparse row path
    s_logits, t_logits = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 3
    full, g_full = _kl_and_grad(s_logits, labels, teacher_targets(t_logits, labels, temperature))
    at_v, g_v = _kl_and_grad(s_logits, labels, _topk_targets(t_logits, labels, V, temperature))
    assert at_v.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(g_v, g_full, atol=1e-6)
    prev = 0.0
    for k in range(1, V):
        kl_k, g_k = _kl_and_grad(s_logits, labels, _topk_targets(t_logits, labels, k, temperature))
        assert prev - 1e-5 <= kl_k.item() <= full.item() + 1e-5  # merging buckets never adds, finer never loses
        assert torch.isfinite(g_k).all()
        prev = kl_k.item()
    # by hand at k = 3: KL between the two 4-bucket distributions (top 3 of the teacher + the rest)
    q = torch.softmax(t_logits / temperature, -1).reshape(-1, V)
    p = torch.softmax(s_logits / temperature, -1).reshape(-1, V)
    top = q.topk(3, -1).indices
    qb = torch.cat([q.gather(1, top), 1 - q.gather(1, top).sum(1, keepdim=True)], 1)
    pb = torch.cat([p.gather(1, top), 1 - p.gather(1, top).sum(1, keepdim=True)], 1)
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    want = (qb * (qb.log() - pb.log())).sum(1)[keep.reshape(-1)].sum() * temperature**2
    got, _ = _kl_and_grad(s_logits, labels, _topk_targets(t_logits, labels, 3, temperature))
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_topk_kl_stays_exact_when_the_student_leaves_almost_nothing_outside_the_top_k():
    """Rows where the student's rest mass is tiny take the exact logsumexp path: value and
    gradient match a float64 computation of the bucketed KL."""
    torch.manual_seed(1)
    B, T, V, k = 2, 5, 17, 4
    labels = torch.randint(0, V, (B, T))
    t_logits = torch.randn(B, T, V) * 3
    top = t_logits.topk(k, -1).indices
    s_logits = torch.randn(B, T, V)
    s_logits[0] = s_logits[0].scatter(-1, top[0], 25.0)  # first sequence: rest mass ~e^-25 (the exact path)
    target = _topk_targets(t_logits, labels, k)
    got, grad = _kl_and_grad(s_logits, labels, target)

    x = s_logits.double().clone().requires_grad_(True)
    q = torch.softmax(t_logits.double(), -1).reshape(-1, V)
    logp = torch.log_softmax(x, -1).reshape(-1, V)
    idx = top.reshape(-1, k)
    q_rest = 1 - q.gather(1, idx).sum(1)
    lp_rest = torch.logsumexp(logp.scatter(1, idx, float("-inf")), -1)
    kl_rows = (q.gather(1, idx) * (q.gather(1, idx).log() - logp.gather(1, idx))).sum(1) + q_rest * (q_rest.log() - lp_rest)
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, :-1] = True
    want = kl_rows[keep.reshape(-1)].sum()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert torch.allclose(grad.double(), x.grad, atol=1e-5)


def test_full_vocabulary_cache_trains_exactly_like_the_live_teacher(data):
    tr, va, tok = data
    s_live, teacher = _pair()
    s_cached, _ = _pair()
    live = distill(s_live, teacher, tr, _cfg(), tokenizer=tok, teacher_tokenizer=tok)
    cache = TeacherCache(teacher, top_k=teacher.config.vocab_size)
    cached = distill(s_cached, cache, tr, _cfg(), tokenizer=tok)
    for (n, a), b in zip(s_live.state_dict().items(), s_cached.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    kl_live = [r["kl"] for r in live.history if r["split"] == "train"]
    kl_cached = [r["kl"] for r in cached.history if r["split"] == "train"]
    assert kl_cached == pytest.approx(kl_live, rel=1e-3, abs=1e-6)  # fp32 sums in another order


def test_each_block_runs_through_the_teacher_once(data):
    tr, va, tok = data
    student, teacher = _pair()
    counter = ForwardCounter(teacher)
    # 3 epochs over the blocks through TrainConfig.teacher_top_k: the teacher sees each block once
    steps = 3 * len(tr) // 4
    res = distill(student, teacher, tr, _cfg(max_steps=steps, teacher_top_k=8), tokenizer=tok)
    assert counter.rows == len(tr)
    kl = [r["kl"] for r in res.history if r["split"] == "train"]
    assert kl[-1] < kl[0]
    # a second student on the same blocks through one shared cache: no teacher forward at all
    cache = TeacherCache(teacher, top_k=8)
    assert cache.fill(tr) == len(tr) and cache.fill(tr) == 0
    seen = counter.rows
    distill(_pair()[0], cache, tr, _cfg(max_steps=4, seed=3), tokenizer=tok)
    assert counter.rows == seen and cache.misses == 0 and cache.hits == 4 * 4


def test_save_load_round_trip_serves_without_the_teacher(data, tmp_path):
    tr, va, tok = data
    _, teacher = _pair()
    cache = TeacherCache(teacher, top_k=5, temperature=2.0)
    cache.fill(tr)
    cache.save(tmp_path / "tc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tc"]  # no temporary left behind
    loaded = TeacherCache.load(tmp_path / "tc")
    assert loaded.teacher is None and len(loaded) == len(tr) and loaded.covers(tr)
    assert (loaded.top_k, loaded.temperature, loaded.block_size, loaded.vocab_size) == (5, 2.0, 32, teacher.config.vocab_size)
    ids, labels = tr.batch(torch.arange(3))
    a, b = cache.targets(ids, labels), loaded.targets(ids, labels)
    assert torch.equal(a.index, b.index) and torch.equal(a.logq, b.logq) and torch.equal(a.log_rest, b.log_rest)
    distill(_pair()[0], loaded, tr, _cfg(max_steps=2, temperature=2.0), tokenizer=tok)  # no teacher needed
    other = torch.full((1, 32), 7)
    with pytest.raises(GPConvError, match="not in the teacher cache and it has no teacher"):
        loaded.targets(other, other)
    loaded.check_teacher(teacher)  # the same teacher passes, and then computes what is missing
    loaded.targets(other, other)
    assert len(loaded) == len(tr) + 1


def test_refusals(data, tmp_path):
    tr, va, tok = data
    student, teacher = _pair()
    cache = TeacherCache(teacher, top_k=4)
    cache.fill(tr)
    cache.save(tmp_path / "tc")
    stranger, _ = tiny_phi3(seed=7, **SMALL)
    with pytest.raises(GPConvError, match="disagrees with the teacher cache"):
        TeacherCache.load(tmp_path / "tc", teacher=stranger)
    with pytest.raises(GPConvError, match="keeps the top 4"):
        distill(student, cache, tr, _cfg(teacher_top_k=8))
    with pytest.raises(GPConvError, match="temperature 1.0"):
        distill(student, cache, tr, _cfg(temperature=2.0))
    with pytest.raises(GPConvError, match="no hidden-state loss"):
        distill(student, teacher, tr, _cfg(teacher_top_k=4, hidden_weight=1.0))
    with pytest.raises(GPConvError, match="blocks of 32 tokens"):
        cache.targets(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(GPConvError, match="teacher_top_k must be >= 0"):
        TrainConfig(teacher_top_k=-1)
    with pytest.raises(GPConvError, match="not a teacher cache"):
        TeacherCache.load(tmp_path)
    (tmp_path / "tc" / CACHE_WEIGHTS).write_bytes(b"\x00" * 10)  # truncated weights: one clear error, no unpickling
    with pytest.raises(GPConvError, match="cannot read the teacher cache"):
        TeacherCache.load(tmp_path / "tc")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(GPConvError, match="not a teacher cache; choose another"):
        cache.save(tmp_path / "model")  # never replaces a directory that is not a cache
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    with pytest.raises(GPConvError, match="empty"):
        TeacherCache(teacher).save(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
