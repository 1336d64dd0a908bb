"""Perplexity: of a transformers causal LM on token windows, or from per-token log-probabilities."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from offline_tuner.events import Progress



@torch.no_grad()
def perplexity_of_model(model, windows: torch.LongTensor, batch_size: int = 4,
                        progress: Progress | None = None) -> float:
    """exp(mean negative log-likelihood) over all windows ``[n, seq_len]``, each on its own.

    Token t of a window is predicted from tokens < t of the same window: seq_len - 1
    predictions per window. Log-softmax in float32 whatever the logits' dtype.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be an int64 [n, seq_len >= 2] tensor, got "
                         f"{windows.dtype} {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)  # [b, T]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # [b, T-1, V]
            # cross_entropy = log_softmax + gather of the target, summed: float32 throughout.
            nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            count += batch[:, 1:].numel()
            if progress:
                done = min(start + batch_size, windows.shape[0])
                progress(f"perplexity: {done}/{windows.shape[0]} windows, "
                         f"running value {math.exp(total_nll / count):.3f}")
    finally:
        model.train(was_training)
    return math.exp(total_nll / count)


def perplexity_from_token_logprobs(logprobs: list[list[float]]) -> float:
    """exp(-mean) over all given log-probabilities (e.g. vLLM prompt_logprobs, one list per text).

    ``None`` entries are skipped: vLLM gives none for the first token of a prompt.
    """
    from signround_vllm.server import perplexity_from_logprobs

    return perplexity_from_logprobs([lp for seq in logprobs for lp in seq])
