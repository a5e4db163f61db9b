"""Edit-quality metrics: answer probabilities, teacher-forced token accuracy, greedy generation, and the
standard CounterFact / MALMEN summaries.

Owns the metric definitions (see /work/shared/REFERENCE_RESULTS.md):
- P(answer | prompt) = exp(mean log-prob of the answer tokens of " " + answer), tokens as `horse.tokens`
  lays them out (a lone leading space token is context, not scored).
- CounterFact, as MEMIT reports it: ES = share of requests with P(target) > P(target_true) on the prompt,
  PS = the same on the rephrases (averaged per request, then over requests), NS = share of locality
  prompts with P(locality_answer) > P(target); Score = harmonic mean of ES, PS, NS. Magnitudes: mean
  P(target) − P(target_true) (ES, PS) and P(locality_answer) − P(target) (NS).
- Token ES / GS / LS, as MALMEN and HORSE report them: per request, the share of answer tokens whose
  teacher-forced argmax is the answer token (prompt → target, rephrase → target, locality prompt →
  locality answer), averaged over requests.
- Generation: greedy continuation of the prompt, cut at its first newline or EOS, lower-cased with runs of
  whitespace collapsed; it matches when it begins with the normalised target followed by a non-alphanumeric
  character or the end (so the answer must be produced before the sentence goes on).

All functions run under no_grad in eval mode (the previous train/eval mode is restored), in batches,
and apply the LM head only at the positions they score when the architecture allows it. The teacher-forced
scores and next tokens take an optional `prefix` (horse/prefix.py): rows it has seen run only the blocks above
its start. Values are fractions in [0, 1]. Dimension key: B requests, T positions, N scored answer tokens,
H hidden, W vocab.

Run the tests with `pytest tests/horse/test_metrics.py`.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from horse.arch import model_device
from horse.errors import EngineError
from horse.tokens import TokenizedBatch, chunked, split_answer, tokenize_pairs, tokenize_prompts
from horse.types import EditRequest

if TYPE_CHECKING:
    from horse.prefix import PrefixCache

# Causal LMs whose logits are exactly lm_head(backbone(...).last_hidden_state): for these the head is
# applied only at scored positions (the W-wide logits at every position are the largest tensor of a pass).
_HEAD_SPLIT_MODELS = frozenset(
    {
        "GPT2LMHeadModel",
        "GPTJForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "GPTNeoXForCausalLM",
    }
)


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def logits_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows_N: torch.Tensor, cols_N: torch.Tensor,
    *, prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """N×W logits at positions (rows_N, cols_N) of a B×T batch, fp32.

    For the known architectures the backbone runs once and the LM head is applied only to the N gathered
    hidden states; otherwise the full logits are computed and gathered. With `prefix`, the blocks below its
    start run only for rows it has not seen (it must belong to these weights: horse/prefix.py).
    """
    if prefix is not None:
        from horse.replay import head_logits, replay_hidden_BTH

        from horse.scope import masking

        cached = prefix.block_input(model, input_ids, attention_mask)
        if cached is not None:
            with masking(model, input_ids):  # a scoped model (horse/scope.py): the mask of these texts
                return head_logits(model, replay_hidden_BTH(model, prefix.start, cached)[rows_N, cols_N])
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(model).__name__ in _HEAD_SPLIT_MODELS and backbone is not None and head is not None:
        hidden_BTH = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return head(hidden_BTH[rows_N, cols_N]).float()
    logits_BTW = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits_BTW[rows_N, cols_N].float()


def _score_batch(model: nn.Module, batch: TokenizedBatch,
                 prefix: PrefixCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean answer log-prob B, answer-token accuracy B) of one tokenised batch."""
    batch = batch.to(model_device(model))
    rows_N, cols_N = batch.answer_positions()
    targets_N = batch.labels[rows_N, cols_N]
    logits_NW = logits_at(model, batch.input_ids, batch.attention_mask, rows_N, cols_N, prefix=prefix)
    logprob_N = torch.log_softmax(logits_NW, dim=-1).gather(1, targets_N[:, None]).squeeze(1)
    correct_N = (logits_NW.argmax(dim=-1) == targets_N).float()
    n_B = batch.answer_lengths_B().float()
    b = batch.input_ids.shape[0]
    logprob_B = torch.zeros(b, device=logprob_N.device).index_add_(0, rows_N, logprob_N) / n_B
    accuracy_B = torch.zeros(b, device=logprob_N.device).index_add_(0, rows_N, correct_N) / n_B
    return logprob_B.cpu(), accuracy_B.cpu()


def score_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
    prefix: PrefixCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both teacher-forced scores of prompt → answer pairs in one pass.

    Returns:
        (mean log-prob of the answer tokens, B float; share of answer tokens argmax-correct, B float).
    """
    if len(prompts) != len(answers):
        raise EngineError(f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    if not prompts:
        return torch.zeros(0), torch.zeros(0)
    logprobs, accuracies = [], []
    with _inference(model):
        for start in range(0, len(prompts), batch_size):
            batch = tokenize_pairs(tok, prompts[start : start + batch_size], answers[start : start + batch_size])
            lp, acc = _score_batch(model, batch, prefix)
            logprobs.append(lp)
            accuracies.append(acc)
    return torch.cat(logprobs), torch.cat(accuracies)


def answer_logprobs(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], *,
    batch_size: int = 32, prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """B float: mean log-prob of the answer tokens of " " + answer after each prompt (P = exp of it)."""
    return score_answers(model, tok, prompts, answers, batch_size=batch_size, prefix=prefix)[0]


def answer_token_accuracy(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], *,
    batch_size: int = 32, prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """B float: share of each answer's tokens whose teacher-forced argmax is that token."""
    return score_answers(model, tok, prompts, answers, batch_size=batch_size, prefix=prefix)[1]


def next_token_ids(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], *, batch_size: int = 32,
    prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """B long: the greedy next token after each prompt (canary agreement compares these)."""
    out = []
    with _inference(model):
        for chunk in chunked(list(prompts), batch_size):
            pb = tokenize_prompts(tok, chunk).to(model_device(model))
            rows = torch.arange(pb.input_ids.shape[0], device=pb.input_ids.device)
            logits_BW = logits_at(model, pb.input_ids, pb.attention_mask, rows, pb.last_index_B, prefix=prefix)
            out.append(logits_BW.argmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def agreement_by_group(next_B: torch.Tensor, base_next_B: torch.Tensor, groups: Sequence[str]) -> dict[str, float]:
    """Share of prompts whose greedy next token equals the base model's, per group label (one per prompt, e.g.
    the data set a canary prompt came from). Groups in first-seen order."""
    if not (len(next_B) == len(base_next_B) == len(groups)):
        raise EngineError(f"{len(next_B)} next tokens, {len(base_next_B)} base tokens and {len(groups)} groups; "
                          "give one of each per prompt")
    same_B = (next_B == base_next_B).float()
    return {g: float(same_B[[i for i, x in enumerate(groups) if x == g]].mean()) for g in dict.fromkeys(groups)}


def normalise_text(text: str) -> str:
    """Lower-case, runs of whitespace collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def continuation_matches(continuation: str, answer: str) -> bool:
    """The generation rule: the continuation, cut at its first newline, normalised, begins with the
    normalised answer followed by a non-alphanumeric character or the end."""
    text = normalise_text(continuation.split("\n", 1)[0])
    want = normalise_text(answer)
    if not want or not text.startswith(want):
        return False
    rest = text[len(want) :]
    return not rest or not rest[0].isalnum()


def greedy_continuations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy decoded text after each prompt (special tokens dropped), at most `max_new_tokens` tokens."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tok.eos_token_id
    )
    texts: list[str] = []
    device = model_device(model)
    with _inference(model):
        for chunk in chunked(list(prompts), batch_size):
            pb = tokenize_prompts(tok, chunk)
            # generate() needs left padding: move each row's real tokens to the right end
            lengths = pb.attention_mask.sum(dim=1)
            width = pb.input_ids.shape[1]
            ids = torch.full_like(pb.input_ids, pad)
            mask = torch.zeros_like(pb.attention_mask)
            for i, n in enumerate(lengths.tolist()):
                ids[i, width - n :] = pb.input_ids[i, :n]
                mask[i, width - n :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row in out[:, width:].cpu():
                texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def generated_matches(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """B bool: does greedy decoding from the prompt produce the answer (rule: `continuation_matches`)?

    Args:
        max_new_tokens: generation budget; default = longest answer's token count + 2.
    """
    if len(prompts) != len(answers):
        raise EngineError(f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    if not prompts:
        return torch.zeros(0, dtype=torch.bool)
    if max_new_tokens is None:
        max_new_tokens = max(sum(len(part) for part in split_answer(tok, a)) for a in answers) + 2
    texts = greedy_continuations(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return torch.tensor([continuation_matches(t, a) for t, a in zip(texts, answers)], dtype=torch.bool)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0, nan when any is nan."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# per-request score names: *_win are 0/1, *_gap are probability differences, token_* / gen_* are 0…1;
# nan marks a request without the fields a score needs (no target_true, no rephrase, no locality prompt).
REQUEST_SCORES = ("es_win", "es_gap", "ps_win", "ps_gap", "ns_win", "ns_gap", "token_es", "token_gs", "token_ls")
GENERATION_SCORES = ("gen_es", "gen_ps")


def request_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 32,
    with_generation: bool = False,
) -> dict[str, torch.Tensor]:
    """Every metric per request, so batches can be concatenated and summarised once (`summarise_scores`).

    Returns:
        name → B float tensor, names in REQUEST_SCORES (+ GENERATION_SCORES when `with_generation`),
        nan where the request lacks the needed fields. Rephrase scores are averaged over a request's
        rephrases; generation uses its first rephrase.
    """
    reqs = list(requests)
    b = len(reqs)
    nan = lambda: torch.full((b,), float("nan"))  # noqa: E731
    out = {name: nan() for name in REQUEST_SCORES}
    if not reqs:
        return out
    prompts = [r.prompt for r in reqs]
    targets = [r.target for r in reqs]

    def score(ps: list[str], ans: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return score_answers(model, tok, ps, ans, batch_size=batch_size)

    lp_new, out["token_es"] = score(prompts, targets)

    # ES: P(target) vs P(target_true) on the prompt
    es_idx = [i for i, r in enumerate(reqs) if r.target_true]
    if es_idx:
        lp_true, _ = score([prompts[i] for i in es_idx], [reqs[i].target_true for i in es_idx])
        p_new, p_true = lp_new[es_idx].exp(), lp_true.exp()
        out["es_win"][es_idx] = (p_new > p_true).float()
        out["es_gap"][es_idx] = p_new - p_true

    # PS and token GS: every rephrase, then averaged per request
    owner = [i for i, r in enumerate(reqs) for _ in r.rephrases]
    ph_prompts = [ph for r in reqs for ph in r.rephrases]
    if owner:
        lp_ph_new, acc_gs = score(ph_prompts, [targets[i] for i in owner])
        rows, values = _per_owner(owner, acc_gs)
        out["token_gs"][rows] = values
        ps_k = [k for k, i in enumerate(owner) if reqs[i].target_true]
        if ps_k:
            lp_ph_true, _ = score([ph_prompts[k] for k in ps_k], [reqs[owner[k]].target_true for k in ps_k])
            p_new, p_true = lp_ph_new[ps_k].exp(), lp_ph_true.exp()
            rows, values = _per_owner([owner[k] for k in ps_k], (p_new > p_true).float())
            out["ps_win"][rows] = values
            rows, values = _per_owner([owner[k] for k in ps_k], p_new - p_true)
            out["ps_gap"][rows] = values

    # NS and token LS: the locality prompt, its own answer against the new target
    loc_idx = [i for i, r in enumerate(reqs) if r.locality_prompt and r.locality_answer]
    if loc_idx:
        loc_prompts = [reqs[i].locality_prompt for i in loc_idx]
        lp_loc_true, out["token_ls"][loc_idx] = score(loc_prompts, [reqs[i].locality_answer for i in loc_idx])
        lp_loc_new, _ = score(loc_prompts, [targets[i] for i in loc_idx])
        out["ns_win"][loc_idx] = (lp_loc_true.exp() > lp_loc_new.exp()).float()
        out["ns_gap"][loc_idx] = lp_loc_true.exp() - lp_loc_new.exp()

    if with_generation:
        out["gen_es"] = generated_matches(model, tok, prompts, targets, batch_size=batch_size).float()
        out["gen_ps"] = nan()
        ph_idx = [i for i, r in enumerate(reqs) if r.rephrases]
        if ph_idx:
            out["gen_ps"][ph_idx] = generated_matches(
                model, tok, [reqs[i].rephrases[0] for i in ph_idx], [targets[i] for i in ph_idx], batch_size=batch_size
            ).float()
    return out


def concat_scores(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-request scores of several batches (keys present in every part)."""
    if not parts:
        return {}
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def _nanmean(t: torch.Tensor) -> tuple[float, int]:
    ok = ~torch.isnan(t)
    n = int(ok.sum())
    return (float(t[ok].double().mean()) if n else float("nan")), n


def summarise_scores(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """The summary metrics from per-request scores (means over the requests that have each score).

    Returns:
        cf_es, cf_ps, cf_ns, cf_score (harmonic mean of the three), cf_es_mag, cf_ps_mag, cf_ns_mag,
        token_es, token_gs, token_ls, gen_es / gen_ps when present, and counts n_requests, n_es, n_ps, n_ns.
    """
    out: dict[str, float] = {}
    names = {"es_win": "cf_es", "ps_win": "cf_ps", "ns_win": "cf_ns",
             "es_gap": "cf_es_mag", "ps_gap": "cf_ps_mag", "ns_gap": "cf_ns_mag"}
    for key, value in scores.items():
        mean, n = _nanmean(value)
        out[names.get(key, key)] = mean
        if key.endswith("_win"):
            out["n_" + key[:2]] = float(n)
    out["n_requests"] = float(len(next(iter(scores.values())))) if scores else 0.0
    out["cf_score"] = harmonic_mean([out.get("cf_es", float("nan")), out.get("cf_ps", float("nan")),
                                     out.get("cf_ns", float("nan"))])
    return out


def evaluate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 32,
    with_generation: bool = True,
) -> dict[str, float]:
    """All standard metrics of `model` on `requests` (call it before and after applying deltas).

    Returns:
        dict of floats (fractions; nan when no request has the needed fields):
        cf_es, cf_ps, cf_ns, cf_score, cf_es_mag, cf_ps_mag, cf_ns_mag,
        token_es, token_gs, token_ls, gen_es, gen_ps (when with_generation),
        and counts n_requests, n_es, n_ps, n_ns.
    """
    return summarise_scores(
        request_scores(model, tok, requests, batch_size=batch_size, with_generation=with_generation)
    )


def _per_owner(owner: Sequence[int], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct owners in order of first appearance, mean of `values` per owner)."""
    keys = list(dict.fromkeys(owner))
    pos = {k: j for j, k in enumerate(keys)}
    index = torch.tensor([pos[o] for o in owner])
    sums = torch.zeros(len(keys)).index_add_(0, index, values.float())
    counts = torch.zeros(len(keys)).index_add_(0, index, torch.ones(len(owner)))
    return torch.tensor(keys), sums / counts


def perplexity(model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over every token of the texts (right-padded batches; padding ignored)."""
    nll, n = 0.0, 0
    device = model_device(model)
    with _inference(model):
        for chunk in chunked(list(texts), batch_size):
            b = tok(list(chunk), return_tensors="pt", padding=True).to(device)
            logits = model(**b).logits[:, :-1].float()
            mask = b.attention_mask[:, 1:].bool()
            lp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
            nll -= float(lp[mask].sum())
            n += int(mask.sum())
    return math.exp(nll / max(n, 1))
