"""UniErase (Yu et al. 2025, arXiv 2505.15674): an unlearning token, then an AlphaEdit edit that leads to it.

Phase 1, the unlearning token: a new token [UNL] is added to the tokenizer and the embedding matrix, and only
its row of the input embeddings (and of the output embeddings when they are not tied: the paper's e_u and
e^_u) is trained, by Adam on the NLL of `prompt [UNL] refusal`, with labels on the refusal only (the model
learns "after [UNL], refuse"; nothing yet leads a prompt to [UNL]). Every other weight is frozen: the other
rows get zero gradients, so Adam (no weight decay) leaves them exactly as they were.

Phase 2, the unlearning edit (AlphaEdit, Fang et al. 2025, on MEMIT's multi-layer scheme): for each forget
question, a target hidden state z at the output of the last edited layer L (at the prompt's last token) is
optimised so that the next token is [UNL] (`target_values`); then layer by layer, the MLP down-projection W
of layer l gets the closed form

    Delta^T = (P K K^T + l2 I)^{-1} P K R^T          (`closed_form_update`)

where K holds the forget prompts' keys (the down-projection's inputs) at layer l, R the remaining residual
(z - h_L) spread over the layers still to edit, and P the projector onto the null space of the preserved
keys' second moment E[k k^T] (eigenvalues below a threshold, `null_space_projector`). Delta = Delta P, so
Delta k ~ 0 for every preserved key: the retain set's outputs stay as they were.

Choices where the paper and its code leave room (docs/guides/unierase.md lists them too):
- one unlearning token for the whole forget set (the authors' code uses one per 400 questions; a forget set
  that a single edit cannot hold is refused, see `check_capacity`);
- the key and the target are taken at the prompt's last token (the authors' EasyEdit run uses a `subject`
  field that TOFU's files do not have); no random context prefixes (MEMIT's templates);
- the preserved keys are every token of the retain set's QA pairs (AlphaEdit uses 100,000 Wikipedia
  samples, which an offline run does not have);
- the target loss is the NLL of [UNL] plus MEMIT's relative weight decay, with MEMIT's norm clamp; no KL
  "essence" term; it stops early once the mean NLL is below `V_STOP_NLL`;
- the new rows start at the mean of the existing embedding rows (deterministic; the authors' code draws
  them at random); phase 1's sequences end with EOS, not with a second [UNL] as in the authors' code, and
  the authors' extra rounds under random perturbations of the edited layers are not done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baldro.data.formatting import IGNORE_INDEX, EncodedQA, collate_encoded, pad_batch
from baldro.errors import BaldroError

LAYER_MODULE = "model.layers.{}"  # the decoder layers (Llama, Mistral, Qwen2, Gemma, SmolLM2, ...)
KEY_MODULE = "model.layers.{}.mlp.down_proj"  # the edited MLP weight; its input is the key
V_STOP_NLL = 0.05  # target values: stop once the mean NLL of [UNL] is below this (MEMIT's criterion)


# ----------------------------------------------------------------------------- the model's parts
def decoder_layers(model) -> int:
    """The number of decoder layers, or a one-line error for an architecture the editor does not know."""
    try:
        layers = model.get_submodule("model.layers")
        model.get_submodule(KEY_MODULE.format(0))
    except AttributeError:
        raise BaldroError(
            f"UniErase edits {KEY_MODULE.format('N')} and {type(model).__name__} has no such module: use a "
            "Llama-style model (Llama, Mistral, Qwen2, Gemma, SmolLM2)"
        ) from None
    return len(layers)


def check_layers(layers: list[int], n_layers: int) -> None:
    """`unierase.layers`: distinct layer indices within the model's `n_layers`."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise BaldroError(
            f"unierase.layers {bad} out of range: this model has {n_layers} decoder layers (0..{n_layers - 1})"
        )


def edited_weights(model, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    return {
        f"{KEY_MODULE.format(layer)}.weight": model.get_submodule(KEY_MODULE.format(layer)).weight for layer in layers
    }


# ----------------------------------------------------------------------------- phase 1: the unlearning token
def add_unlearning_token(model, tokenizer, token: str) -> int:
    """Add `token` to the tokenizer (as a special token) and a row for it to the input and output embeddings,
    set to the mean of the existing rows; returns its id."""
    if not hasattr(tokenizer, "add_tokens"):
        raise BaldroError(
            f"the tokenizer ({type(tokenizer).__name__}) cannot take a new token: use a Hugging Face tokenizer"
        )
    if token in tokenizer.get_vocab():
        raise BaldroError(f"unierase.token {token!r} is already in the tokenizer's vocabulary: choose a new string")
    added = tokenizer.add_tokens([token], special_tokens=True)
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if added != 1 or len(ids) != 1:
        raise BaldroError(
            f"the tokenizer ({type(tokenizer).__name__}) did not take {token!r} as one new token: choose "
            "another unierase.token or a tokenizer that can add tokens"
        )
    token_id = ids[0]
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(len(tokenizer), old), mean_resizing=False)
    with torch.no_grad():
        for emb in {
            id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None
        }.values():
            emb.weight[token_id] = emb.weight[:old].mean(dim=0)
    return token_id


def token_sequences(formatter, questions: list[str], refusals: list[str], token: str, token_id: int) -> list[EncodedQA]:
    """`prompt [UNL] refusal EOS` with labels on the refusal and EOS only."""
    encoded = formatter.encode_many(questions, [token + r for r in refusals], "unlearning token")
    out = []
    for e in encoded:
        if e.input_ids[e.prompt_len] != token_id:
            raise BaldroError(f"the tokenizer split {token!r} from the prompt's end: choose another unierase.token")
        labels = list(e.labels)
        labels[e.prompt_len] = IGNORE_INDEX
        out.append(EncodedQA(e.input_ids, labels, e.prompt_len + 1))
    return out


def train_token(
    model, token_id: int, sequences: list[EncodedQA], pad_id: int, *, epochs: int, lr: float, batch_size: int, seed: int
) -> list[float]:
    """Phase 1: Adam on the token's embedding rows only (every other weight frozen); each epoch's mean loss."""
    params = {
        id(e.weight): e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None
    }
    params = list(params.values())
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    hooks = []
    for p in params:
        p.requires_grad_(True)
        mask = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
        mask[token_id] = 1
        hooks.append(p.register_hook(lambda g, m=mask: g * m))
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = params[0].device
    losses = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(sequences), generator=generator).tolist()
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = collate_encoded([sequences[i] for i in order[start : start + batch_size]], pad_id)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / max(1, -(-len(order) // batch_size)))
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)
    return losses


# ----------------------------------------------------------------------------- the linear algebra (pure)
def null_space_projector(second_moment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int, torch.Tensor]:
    """P = U U^T over the eigenvectors of the preserved keys' second moment whose eigenvalue is below
    `threshold` (AlphaEdit); returns P, the null space's dimension and the eigenvalues (ascending)."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    kept = vectors[:, values < threshold]
    return (kept @ kept.T).float(), kept.shape[1], values.cpu()


def closed_form_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's update of a weight W (d_out x d_in) so that W k_i moves by r_i, within the null space P:
    Delta = ((P K K^T + l2 I)^{-1} P K R^T)^T; `keys` K is d_in x n, `resid` R is d_out x n."""
    k, r, p = keys.double(), resid.double(), projector.double()
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(p @ k @ k.T + l2 * eye, p @ k @ r.T).T.to(keys.dtype)


# ----------------------------------------------------------------------------- forward passes with hooks
def _prompt_batch(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch(prompts, pad_id)
    last = torch.tensor([len(p) - 1 for p in prompts])
    return ids.to(device), mask.to(device), last.to(device)


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def second_moments(
    model, layers: list[int], sequences: list[list[int]], pad_id: int, batch_size: int
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k k^T] (float64, on the model's device) of the keys (down-projection inputs) at each of `layers` over
    every token of `sequences`, from one pass over them, and the number of keys."""
    totals: dict[int, torch.Tensor] = {}
    count = 0
    current = {}

    def hook_for(layer):
        def hook(_, args):
            k = args[0][current["mask"].to(args[0].device)].double()
            totals[layer] = k.T @ k if layer not in totals else totals[layer] + k.T @ k

        return hook

    handles = [
        model.get_submodule(KEY_MODULE.format(layer)).register_forward_pre_hook(hook_for(layer)) for layer in layers
    ]
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                ids, mask = pad_batch(sequences[start : start + batch_size], pad_id)
                current["mask"] = mask.bool()
                count += int(mask.sum())
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: total / max(count, 1) for layer, total in totals.items()}, count


def keys_and_hidden(
    model, layer: int, last_layer: int, prompts: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """At each prompt's last token: the key at `layer` (n x d_in) and the output of `last_layer` (n x d)."""
    ids, mask, last = _prompt_batch(prompts, pad_id, model.device)
    rows = torch.arange(len(prompts), device=ids.device)
    seen = {}
    key_hook = model.get_submodule(KEY_MODULE.format(layer)).register_forward_pre_hook(
        lambda _, args: seen.__setitem__("k", args[0][rows, last].detach())
    )
    out_hook = model.get_submodule(LAYER_MODULE.format(last_layer)).register_forward_hook(
        lambda _, __, output: seen.__setitem__("h", _output_tensor(output)[rows, last].detach())
    )
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        key_hook.remove()
        out_hook.remove()
    return seen["k"].float(), seen["h"].float()


def target_values(
    model,
    last_layer: int,
    prompts: list[list[int]],
    token_id: int,
    pad_id: int,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
) -> tuple[torch.Tensor, dict]:
    """z = h_L + delta per prompt: delta (at the last layer's output, the prompt's last token) minimises the NLL
    of [UNL] as the next token + weight_decay * |delta|^2 / |h|^2, its norm clamped to clamp_norm_factor |h|."""
    ids, mask, last = _prompt_batch(prompts, pad_id, model.device)
    rows = torch.arange(len(prompts), device=ids.device)
    layer = model.get_submodule(LAYER_MODULE.format(last_layer))
    delta = torch.zeros(len(prompts), model.config.hidden_size, device=ids.device, requires_grad=True)
    base = {}

    def hook(_, __, output):
        hidden = _output_tensor(output)
        if "h" not in base:
            base["h"] = hidden[rows, last].detach().float()
        hidden = hidden.clone()
        hidden[rows, last] = hidden[rows, last] + delta.to(hidden.dtype)
        return _replace_output(output, hidden)

    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    optimizer = torch.optim.Adam([delta], lr=lr)
    handle = layer.register_forward_hook(hook)
    nll = torch.tensor(float("nan"))
    done = 0
    try:
        for step in range(steps + 1):  # the last pass only measures
            logits = model(input_ids=ids, attention_mask=mask).logits[rows, last].float()
            nll = -F.log_softmax(logits, dim=-1)[:, token_id]
            h_norm = base["h"].norm(dim=-1)
            loss = nll.mean() + weight_decay * (delta.norm(dim=-1) ** 2 / h_norm**2).mean()
            if nll.mean().item() < V_STOP_NLL or step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            with torch.no_grad():
                limit = clamp_norm_factor * h_norm
                norm = delta.norm(dim=-1)
                delta.mul_(torch.where(norm > limit, limit / norm.clamp_min(1e-12), torch.ones_like(norm))[:, None])
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return (base["h"] + delta.detach()), {"target_steps": done, "target_nll": float(nll.mean().item())}


def check_capacity(null_dims: dict[int, int], n_forget: int, threshold: float) -> None:
    """A single edit maps the forget keys' null-space parts to their targets: with more forget questions than
    the null space has dimensions, their parts are linearly dependent and the edit cannot hold them all."""
    small = {layer: dim for layer, dim in null_dims.items() if dim < n_forget}
    if small:
        layer, dim = min(small.items(), key=lambda kv: kv[1])
        raise BaldroError(
            f"the forget set ({n_forget} questions) is larger than the edit can hold: the retain keys leave a "
            f"{dim}-dimensional null space at layer {layer} (eigenvalues < unierase.nullspace_threshold={threshold:g}), "
            "and an edit confined to it maps at most that many independent keys: forget fewer questions (data.limit, "
            "a smaller split) or raise unierase.nullspace_threshold"
        )


def unlearning_edit(
    model,
    layers: list[int],
    prompts: list[list[int]],
    token_id: int,
    pad_id: int,
    projectors: dict[int, torch.Tensor],
    *,
    l2: float,
    steps: int,
    lr: float,
    weight_decay: float,
    clamp_norm_factor: float,
) -> dict:
    """Phase 2: the multi-layer AlphaEdit edit leading every prompt to [UNL]; returns what it did."""
    layers = sorted(layers)
    last_layer = layers[-1]
    z, info = target_values(
        model,
        last_layer,
        prompts,
        token_id,
        pad_id,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        clamp_norm_factor=clamp_norm_factor,
    )
    norms = {}
    for i, layer in enumerate(layers):
        keys, hidden = keys_and_hidden(model, layer, last_layer, prompts, pad_id)
        resid = (z - hidden).T / (len(layers) - i)
        weight = model.get_submodule(KEY_MODULE.format(layer)).weight
        p = projectors[layer].to(weight.device)
        delta = closed_form_update(keys.T, resid, p, l2)
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))
        norms[str(layer)] = float(delta.norm().item())
    return {**info, "delta_norms": norms}


def next_tokens(model, prompts: list[list[int]], pad_id: int, batch_size: int = 32) -> list[int]:
    """The greedy next token after each prompt."""
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask, last = _prompt_batch(chunk, pad_id, model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            out += logits[torch.arange(len(chunk), device=ids.device), last].argmax(-1).tolist()
    return out
