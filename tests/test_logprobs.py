import weakref

import pytest
import torch

from align.ops.logprobs import IGNORE_INDEX, LogitTransform, token_logprobs, weighted_logprob_sum


def full_logprobs(hidden, head, labels):
    """The reference: log-softmax over the whole vocabulary, the labels' log-probs, 0 at ignored labels."""
    full = torch.log_softmax(head(hidden), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return full * (labels != IGNORE_INDEX)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_match_full_log_softmax_values_and_gradients(bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 70, bias=bias).double()
    labels = torch.randint(0, 70, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    ours = token_logprobs(hidden, head, labels, chunk_size=5)
    full = full_logprobs(hidden, head, labels)
    torch.testing.assert_close(ours.double(), full, atol=1e-5, rtol=0)
    assert (ours[labels == IGNORE_INDEX] == 0).all()
    weights = torch.randn(3, 9, dtype=torch.float64)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), params),
                    torch.autograd.grad((full * weights).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_temperature_divides_logits():
    torch.manual_seed(1)
    hidden, head = torch.randn(1, 4, 8), torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (1, 4))
    ours = token_logprobs(hidden, head, labels, temperature=0.7)
    full = torch.log_softmax(head(hidden) / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(ours, full, atol=1e-6, rtol=0)


def test_entropy_matches_full_softmax_entropy_and_leaves_gradients_alone():
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 13, bias=False)
    labels = torch.randint(0, 13, (2, 6))
    labels[1, :2] = IGNORE_INDEX
    logps, entropy = token_logprobs(hidden, head, labels, chunk_size=4, return_entropy=True)
    logp_all = torch.log_softmax(head(hidden), -1)
    want = -(logp_all.exp() * logp_all).sum(-1) * (labels != IGNORE_INDEX)
    torch.testing.assert_close(entropy, want.detach(), atol=1e-5, rtol=0)
    assert not entropy.requires_grad
    # other chunk sizes sum in other orders: equal to float32 rounding on any CPU and thread count
    torch.testing.assert_close(logps, token_logprobs(hidden, head, labels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_weighted_sum_computes_value_and_gradient_in_the_forward(bias):
    """The SFT path: sum(w * logp) whose gradient is made in the forward equals the plain sum."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    labels = torch.randint(0, 50, (2, 7))
    labels[1, :3] = IGNORE_INDEX
    weights = torch.rand(2, 7, dtype=torch.float64)
    ours, logps, entropy = weighted_logprob_sum(hidden, head, labels, weights, chunk_size=4)
    full = full_logprobs(hidden, head, labels)
    plain = (full * weights).sum()
    assert entropy is None and not logps.requires_grad
    torch.testing.assert_close(logps.double(), full.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.double(), plain, atol=1e-5, rtol=0)  # float32 logits, as token_logprobs
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    for a, b in zip(torch.autograd.grad(3.0 * ours, params), torch.autograd.grad(3.0 * plain, params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():  # evaluation: the value alone
        torch.testing.assert_close(weighted_logprob_sum(hidden, head, labels, weights)[0], ours.detach())


@pytest.mark.parametrize("transform", [LogitTransform(scale=0.3), LogitTransform(softcap=1.5),
                                       LogitTransform(scale=2.0, softcap=0.8)])
@pytest.mark.parametrize("fused", [False, True])
def test_logit_post_processing_and_temperature_match_the_full_computation(transform, fused):
    """softcap(scale * (W h + b)) / T, as Gemma/Cohere/Granite and the sampler do (the bias divided
    by T too): values and gradients of both chunked ops against autograd through the full logits."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=True).double()
    torch.nn.init.normal_(head.bias, std=2.0)
    labels = torch.randint(0, 40, (2, 7))
    labels[0, :2] = IGNORE_INDEX
    weights = torch.randn(2, 7, dtype=torch.float64)
    z = head(hidden) * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    full = torch.log_softmax(z / 0.6, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != IGNORE_INDEX)
    if fused:
        total, ours, _ = weighted_logprob_sum(hidden, head, labels, weights, chunk_size=5, temperature=0.6,
                                              transform=transform)
    else:
        ours = token_logprobs(hidden, head, labels, chunk_size=5, temperature=0.6, transform=transform)
        total = (ours * weights).sum()
    torch.testing.assert_close(ours.double(), full.detach(), atol=1e-5, rtol=0)
    params = [hidden, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad(total, params), torch.autograd.grad((full * weights).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_chunks_are_large_on_an_accelerator_and_small_on_a_cpu():
    from align.ops.logprobs import CHUNK_SIZE, default_chunk_size

    assert default_chunk_size(torch.device("cpu"), 151_936) == CHUNK_SIZE
    assert default_chunk_size(torch.device("cuda"), 32_000) == 4194  # ~512 MiB of float32 logits a block
    assert default_chunk_size(torch.device("cuda"), 151_936) == CHUNK_SIZE
    assert default_chunk_size(torch.device("cuda"), 1_000_000) == CHUNK_SIZE


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of tensor storages that ops create while it is entered and that are still alive
    (each storage counted once, until it is freed). Sees what reaches the dispatcher from Python: a
    kernel's own scratch memory is not counted, so this is a lower bound, exact in what it counts."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self.storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.storages:
                    self.storages.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_chunk_holds_at_most_about_two_logit_blocks(autocast, softcap):
    """A [chunk, V] float32 block of logits is the big transient of the lm-head; on a GPU it comes on
    top of every layer's activations at the end of the forward. Each chunk releases its blocks before
    the next one starts, and a chunk's logits go as soon as its (log-)softmax is taken: at most the
    two blocks of that op live at once (before: ~3.6 blocks under autocast, the previous chunk's
    log-softmax, the logits and the GEMMs' bf16 copy alive together). A soft-cap's derivative is a
    third block where a gradient is made, and none in the plain forward, which makes no gradient."""
    torch.manual_seed(0)
    tokens, vocab, chunk = 1024, 50_000, 256
    block = chunk * vocab * 4
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(1, tokens, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    weights = torch.full((1, tokens), 1.0 / tokens)
    transform = LogitTransform(softcap=softcap)
    losses = {"fused": lambda: weighted_logprob_sum(hidden, head, labels, weights, chunk_size=chunk,
                                                    transform=transform)[0],
              "plain": lambda: token_logprobs(hidden, head, labels, chunk_size=chunk, transform=transform).sum()}
    peaks = {}
    for name, loss_fn in losses.items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), _LiveBytes() as forward:
            loss = loss_fn()
        with _LiveBytes() as backward:
            loss.backward()
        peaks[name] = (forward.peak / block, backward.peak / block)
    gradient_blocks = 2.3 if softcap is None else 3.3
    assert peaks["fused"][0] < gradient_blocks, peaks  # (the backward only scales the gradients the forward made)
    assert peaks["plain"][0] < 2.0 and peaks["plain"][1] < gradient_blocks, peaks


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every matrix multiply that reaches the kernels, and the shapes of
    the float32 tensors cast down to a 16-bit dtype."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
               torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.dtypes, self.down_casts = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.dtypes.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and out.dtype == torch.bfloat16:
            self.down_casts.append(tuple(args[0].shape))
        return out


@pytest.mark.parametrize("fused", [False, True])
def test_under_autocast_every_lm_head_matmul_runs_in_its_dtype_forward_and_backward(fused):
    """Under bf16 autocast the logits, d hidden and d weight matmuls all run in bf16, as a plain
    lm-head's do under autocast (a GPU runs float32 GEMMs ~15x slower): autograd runs a backward
    outside the forward's autocast, and an in-place addmm_ is never autocast. The results stay
    what the plain head gives under the same autocast, to bf16 rounding."""
    torch.manual_seed(4)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    head = torch.nn.Linear(32, 300, bias=False)
    labels = torch.randint(0, 300, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    weights = torch.randn(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes() as seen:
        if fused:
            total, ours, _ = weighted_logprob_sum(hidden, head, labels, weights, chunk_size=5)
        else:
            ours = token_logprobs(hidden, head, labels, chunk_size=5)
            total = (ours * weights).sum()
        grads = torch.autograd.grad(total, [hidden, head.weight])
    # three chunks of the 15 labelled tokens; per chunk: logits, d hidden, d weight (and the unfused
    # backward recomputes the logits)
    assert len(seen.dtypes) == 3 * (3 if fused else 4)
    assert all(dtype == torch.bfloat16 for dtypes in seen.dtypes for dtype in dtypes), seen.dtypes
    # each chunk's [n, V] logit gradient is cast down once for both gradient matmuls
    assert [shape for shape in seen.down_casts if shape in ((5, 300), (300, 5))] == [(5, 300)] * 3
    assert all(g.dtype == torch.float32 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = torch.log_softmax(head(hidden).float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        full = full * (labels != IGNORE_INDEX)
        plain = torch.autograd.grad((full * weights).sum(), [hidden, head.weight])
    torch.testing.assert_close(ours, full.detach(), atol=2e-2, rtol=0)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_float64_inputs_under_autocast_keep_float64_as_autocast_does(fused):
    """Autocast leaves float64 tensors alone, so the op must too (a bf16 weight-gradient GEMM on
    them would mix dtypes): the same values and gradients as without autocast."""
    torch.manual_seed(5)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=False).double()
    labels = torch.randint(0, 30, (2, 6))
    weights = torch.rand(2, 6, dtype=torch.float64)

    def run():
        if fused:
            total = weighted_logprob_sum(hidden, head, labels, weights, chunk_size=5)[0]
        else:
            total = (token_logprobs(hidden, head, labels, chunk_size=5) * weights).sum()
        return total, torch.autograd.grad(total, [hidden, head.weight])

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run()
    torch.testing.assert_close(autocast[0], plain[0])
    for a, b in zip(autocast[1], plain[1]):
        torch.testing.assert_close(a, b)


def test_a_no_grad_pass_of_the_fused_sum_makes_no_gradient():
    """An evaluation of a fully trained lm-head (no-grad mode, so its hidden states need no gradient
    but its weight still does) runs one matmul a chunk, the logits, and no gradient's: the same
    value, at half the lm-head's work and without a [V, H] float32 buffer."""
    torch.manual_seed(5)
    hidden = torch.randn(2, 9, 32)
    head = torch.nn.Linear(32, 300, bias=True)
    labels = torch.randint(0, 300, (2, 9))
    weights = torch.randn(2, 9)
    transform = LogitTransform(softcap=3.0)
    with _MatmulDtypes() as trained:
        want = weighted_logprob_sum(hidden, head, labels, weights, chunk_size=5, transform=transform)[0]
    with _MatmulDtypes() as evaluated, torch.no_grad():
        got = weighted_logprob_sum(hidden, head, labels, weights, chunk_size=5, transform=transform)[0]
    chunks = 4  # 18 labelled positions in chunks of 5
    assert (len(trained.dtypes), len(evaluated.dtypes)) == (2 * chunks, chunks)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
