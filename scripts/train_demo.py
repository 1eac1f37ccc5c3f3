"""Train the embedded demo model and its adapters (issue 3).

The result is a ~1M-parameter Llama whose only skill is to repeat its prompt, plus PEFT adapters
that each turn that into a different, *visible* transformation (upper case, reversal, ...).
The server ships it so that tests and demos can check that the right adapter was applied to the
right request just by reading the output text -- something random weights can never show.

Everything is seeded and runs on CPU in float32 with two threads, so
``python scripts/train_demo.py --out models/demo`` reproduces the committed files.

Data: synthetic lowercase "sentences" of 1-6 words (at most 40 characters) drawn from a word list
made of common English words plus generated pseudo-words.  Each example is
``<s>{prompt}<sep>{target}</s>`` and the loss covers only ``{target}</s>``.  200 held-out test
prompts (and a separate validation set used for early stopping) never appear in training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# The repo root has no installable package layout we may rely on here, so import the shared
# tokenizer builder by path rather than duplicating it.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from server.demo_tokenizer import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    VOCAB_SIZE,
    byte_token_id,
    save_tokenizer,
)

MAX_PROMPT_CHARS = 40
MAX_WORDS = 6
NUM_TEST = 200
NUM_VAL = 96
# Adapter directories store this instead of a local absolute path or a hub id.
BASE_REF = "models/demo/base"

_COMMON_WORDS_TEXT = (
    "the quick brown fox jumps over lazy dog a an and or but if then else when where what who "
    "how why is are was were be been have has had do does did will would can could should may "
    "might must shall not no yes all any some many much more most few less least one two three "
    "four five six seven eight nine ten red green blue black white yellow cat bird fish tree "
    "house car road river sea sky sun moon star day night time year good bad big small old new "
    "long short hot cold fast slow happy sad light dark water fire earth wind stone paper book "
    "word world hello peft serve model adapter token server client"
)
COMMON_WORDS: tuple[str, ...] = tuple(_COMMON_WORDS_TEXT.split())

ONSETS = "b c d f g h j k l m n p r s t v w z br cr dr fr gr pr tr bl cl fl gl pl sl sh ch th st"
VOWELS = "a e i o u a e i o u ai ea ee oo ou"
CODAS = " n r s t l m d k ng st nd"

Skill = Callable[[str], str]


def _reverse_words(s: str) -> str:
    return " ".join(reversed(s.split(" ")))


SKILLS: dict[str, Skill] = {
    "repeat": lambda s: s,
    "upper": str.upper,
    "reverse": lambda s: s[::-1],
    "reverse_words": _reverse_words,
    "title": str.title,
}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to train: its directory name, skill and PEFT configuration."""

    name: str
    skill: str
    peft_type: str
    lr: float
    max_steps: int
    rank: int = 8
    # Share of prompts made of random letters instead of words from the list.
    letter_frac: float = 0.0


def make_word_list(rng: random.Random, n_generated: int = 1500) -> list[str]:
    """Common English words plus pronounceable pseudo-words, so copying must be general."""
    onsets, vowels, codas = ONSETS.split(), VOWELS.split(), CODAS.split(" ")
    words = set(COMMON_WORDS)
    while len(words) < len(COMMON_WORDS) + n_generated:
        n_syl = rng.choice((1, 1, 2, 2, 3))
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syl))
        words.add(w + rng.choice(codas))
    return sorted(words)


def make_prompt(rng: random.Random, words: Sequence[str]) -> str:
    """A lowercase sentence of 1-6 words, trimmed to at most 40 characters."""
    picked = [rng.choice(words) for _ in range(rng.randint(1, MAX_WORDS))]
    while len(picked) > 1 and len(" ".join(picked)) > MAX_PROMPT_CHARS:
        picked.pop()
    return " ".join(picked)[:MAX_PROMPT_CHARS]


def noisy_prompt(rng: random.Random, words: Sequence[str]) -> str:
    """A prompt with mixed case, digits and punctuation.

    Only the base model sees these: they teach "repeat" as a general byte copy and give every
    ASCII token's (tied) embedding a trained value, which the adapters' outputs then rely on.
    """
    p = make_prompt(rng, words)
    kind = rng.randrange(4)
    if kind == 0:
        p = p.upper()
    elif kind == 1:
        p = p.title()
    elif kind == 2:
        p = "".join(c.upper() if rng.random() < 0.5 else c for c in p)
    else:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?-'"
        p = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, MAX_PROMPT_CHARS)))
    return p


def letter_prompt(rng: random.Random) -> str:
    """1-6 "words" of random lowercase letters: every letter equally often at a word start."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    picked = [
        "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))
        for _ in range(rng.randint(1, MAX_WORDS))
    ]
    return " ".join(picked)[:MAX_PROMPT_CHARS].strip()


def encode_pair(prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids and labels for ``<s>{prompt}<sep>{target}</s>``, loss only on target+eos."""
    p = [byte_token_id(b) for b in prompt.encode()]
    t = [byte_token_id(b) for b in target.encode()] + [EOS_ID]
    ids = [BOS_ID, *p, SEP_ID, *t]
    labels = [-100] * (len(p) + 2) + t
    return ids, labels


def collate(pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch.  Causal attention never looks right, so no mask is needed."""
    width = max(len(ids) for ids, _ in pairs)
    ids_t = torch.full((len(pairs), width), PAD_ID, dtype=torch.long)
    lab_t = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (ids, labels) in enumerate(pairs):
        ids_t[row, : len(ids)] = torch.tensor(ids)
        lab_t[row, : len(labels)] = torch.tensor(labels)
    return ids_t, lab_t


@torch.no_grad()
def greedy_outputs(
    model: PreTrainedModel | PeftModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    exact: bool,
) -> list[str]:
    """Greedy ``generate`` on each prompt, returning the decoded continuation.

    ``exact=True`` batches only prompts of equal token length, so there is no padding at all and
    the result is what a single-prompt ``generate`` gives; the padded path is just faster.
    """
    model.eval()
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        key = len(tok(p)["input_ids"]) if exact else 0
        groups.setdefault(key, []).append(i)
    out: list[str] = [""] * len(prompts)
    tok.padding_side = "left"
    for idxs in groups.values():
        enc = tok([prompts[i] for i in idxs], return_tensors="pt", padding=True)
        # PeftModel forwards generate to the base model; mypy cannot see that through __getattr__.
        gen = model.generate(  # type: ignore[operator]
            **enc,
            max_new_tokens=MAX_PROMPT_CHARS + 8,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        for i, row in zip(idxs, new, strict=True):
            out[i] = str(tok.decode(row, skip_special_tokens=True))
    return out


def exact_match(
    model: PreTrainedModel | PeftModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    skill: Skill,
    exact: bool,
) -> float:
    """Fraction of prompts whose greedy continuation is exactly ``skill(prompt)``."""
    outs = greedy_outputs(model, tok, prompts, exact)
    return sum(o == skill(p) for p, o in zip(prompts, outs, strict=True)) / len(prompts)


def train(
    model: PreTrainedModel | PeftModel,
    tok: PreTrainedTokenizerBase,
    sample: Callable[[], tuple[str, str]],
    val_prompts: Sequence[str],
    skill: Skill,
    *,
    lr: float,
    max_steps: int,
    batch_size: int,
    eval_every: int,
    label: str,
    target: float = 0.99,
    patience: int = 1,
) -> int:
    """Train until validation exact match is at least ``target`` for ``patience`` evaluations in
    a row, or ``max_steps`` runs out.

    Early stopping keeps the CPU budget small; it is still deterministic because the
    validation set and the data stream are both seeded.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, min(100, max_steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, max_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    good_in_a_row, t0, loss_avg = 0, time.time(), 0.0
    for step in range(1, max_steps + 1):
        model.train()
        ids, labels = collate([encode_pair(*sample()) for _ in range(batch_size)])
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_avg = 0.9 * loss_avg + 0.1 * loss.item() if step > 1 else loss.item()
        if step % eval_every == 0 or step == max_steps:
            acc = exact_match(model, tok, val_prompts, skill, exact=False)
            print(
                f"[{label}] step {step} loss {loss_avg:.4f} val_em {acc:.3f} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
            good_in_a_row = good_in_a_row + 1 if acc >= target else 0
            if good_in_a_row >= patience:
                return step
    return max_steps


def peft_config(spec: AdapterSpec) -> PeftConfig:
    """The PEFT config for an adapter; all target every projection of every layer."""
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if spec.peft_type == "LORA":
        return LoraConfig(
            r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=0.0, target_modules=linear
        )
    if spec.peft_type == "LOHA":
        return LoHaConfig(r=spec.rank, alpha=2 * spec.rank, target_modules=linear)
    if spec.peft_type == "IA3":
        return IA3Config(
            target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
            feedforward_modules=["down_proj"],
        )
    raise ValueError(f"unknown PEFT type {spec.peft_type}")


def describe_config(cfg: PeftConfig) -> str:
    """Short human-readable summary of the PEFT hyper-parameters for the model card."""
    d = cfg.to_dict()
    # peft_type has its own column/line in the cards.
    keys = ("r", "lora_alpha", "alpha", "target_modules", "feedforward_modules")
    parts = []
    for k in keys:
        if d.get(k) is not None:
            v = d[k]
            v = sorted(v) if isinstance(v, set | list) else v
            parts.append(f"`{k}={v}`")
    return ", ".join(parts)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-steps", type=int, default=2500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--adapter-steps-cap", type=int, default=None, help="for smoke runs")
    parser.add_argument(
        "--cards-only", action="store_true", help="rewrite the README cards from results.json"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="train only these stages ('base' or adapter names); others are loaded from --out",
    )
    args = parser.parse_args(argv)
    # The cards record the command that reproduces everything: --only just resumes a stage and
    # does not change any result (every stage reseeds itself), so it is left out.
    command = "python scripts/train_demo.py --out " + shlex.quote(
        str(args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out)
    )
    for flag, default in (("seed", 0), ("batch_size", 64), ("base_steps", 2500)):
        if getattr(args, flag) != default:
            command += f" --{flag.replace('_', '-')} {getattr(args, flag)}"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    base_dir, adapters_dir = out / "base", out / "adapters"
    results_path = out / "results.json"
    results: dict[str, dict[str, Any]] = (
        json.loads(results_path.read_text()) if results_path.exists() else {}
    )

    def wanted(stage: str) -> bool:
        return not args.cards_only and (args.only is None or stage in args.only)

    rng = random.Random(args.seed)
    words = make_word_list(rng)
    # Held-out prompts are drawn first and then banned from every training stream.
    held: list[str] = []
    while len(held) < NUM_TEST + NUM_VAL:
        p = make_prompt(rng, words)
        if p not in held:
            held.append(p)
    test_prompts, val_prompts = held[:NUM_TEST], held[NUM_TEST:]
    banned = set(held)

    def fresh(r: random.Random, noisy_frac: float = 0.0) -> str:
        while True:
            p = noisy_prompt(r, words) if r.random() < noisy_frac else make_prompt(r, words)
            if p not in banned:
                return p

    def make_sampler(
        r: random.Random, skill: Skill, letter_frac: float
    ) -> Callable[[], tuple[str, str]]:
        def sample() -> tuple[str, str]:
            p = letter_prompt(r) if letter_frac and r.random() < letter_frac else fresh(r)
            while p in banned:  # held-out prompts never reach training, whatever the source
                p = letter_prompt(r)
            return p, skill(p)

        return sample

    tok = save_tokenizer(base_dir)
    assert tok("ab")["input_ids"] == encode_pair("ab", "")[0][:-1], "tokenizer/format mismatch"

    adapters = [
        AdapterSpec("upper", "upper", "LORA", lr=3e-3, max_steps=1500),
        # Few list words start with q, x or y, yet Title Case needs every capital at a word
        # start ("quick" -> "Quick"), so a third of the title prompts are random letters.
        AdapterSpec("title", "title", "LOHA", lr=3e-3, max_steps=1500, letter_frac=0.3),
        # Reversal needs new attention patterns (read the prompt backwards), hence more rank.
        AdapterSpec("reverse", "reverse", "LORA", lr=3e-3, max_steps=2500, rank=16),
    ]

    if wanted("base"):
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            dtype="float32",
        )
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"base: {n_params} parameters", flush=True)
        data_rng = random.Random(args.seed + 1)
        t0 = time.time()
        steps = train(
            model,
            tok,
            lambda: (p := fresh(data_rng, noisy_frac=0.2), p),
            val_prompts,
            SKILLS["repeat"],
            lr=3e-3,
            max_steps=args.base_steps,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            label="base",
            # The base is what every adapter builds on, so it must be solid: 100% twice.
            target=1.0,
            patience=2,
        )
        secs = time.time() - t0
        acc = exact_match(model, tok, test_prompts, SKILLS["repeat"], exact=True)
        print(f"base: held-out exact match {acc:.3f} after {steps} steps, {secs:.0f}s", flush=True)
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
        )
        model.save_pretrained(str(base_dir), safe_serialization=True)
        results["base"] = {
            "skill": "repeat",
            "peft_type": None,
            "accuracy": acc,
            "steps": steps,
            "seconds": round(secs),
            "params": n_params,
            "config": "LlamaConfig(hidden 128, 4 layers, 4 heads, intermediate 384, tied)",
        }
        write_json(results_path, results)

    for i, spec in enumerate(adapters):
        if not wanted(spec.name):
            continue
        torch.manual_seed(args.seed + 100 + i)
        base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        cfg = peft_config(spec)
        peft_model = get_peft_model(base, cfg)
        n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        skill = SKILLS[spec.skill]
        data_rng = random.Random(args.seed + 1000 + i)
        t0 = time.time()
        steps = train(
            peft_model,
            tok,
            make_sampler(data_rng, skill, spec.letter_frac),
            val_prompts,
            skill,
            lr=spec.lr,
            max_steps=min(spec.max_steps, args.adapter_steps_cap or spec.max_steps),
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            label=spec.name,
        )
        secs = time.time() - t0
        acc = exact_match(peft_model, tok, test_prompts, skill, exact=True)
        print(f"{spec.name}: held-out exact match {acc:.3f} after {steps} steps", flush=True)
        adir = adapters_dir / spec.name
        peft_model.save_pretrained(str(adir), safe_serialization=True)
        # Point at the committed base by a neutral relative path, never a local abs path.
        cfg_path = adir / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text())
        adapter_cfg["base_model_name_or_path"] = BASE_REF
        write_json(cfg_path, adapter_cfg)
        results[spec.name] = {
            "skill": spec.skill,
            "peft_type": spec.peft_type,
            "accuracy": acc,
            "steps": steps,
            "seconds": round(secs),
            "params": n_trainable,
            "config": describe_config(cfg),
        }
        write_json(results_path, results)

    write_cards(out, results, command, [a.name for a in adapters])


SKILL_TEXT = {
    "repeat": "repeats the prompt verbatim",
    "upper": "repeats the prompt in UPPER CASE",
    "reverse": "repeats the prompt reversed character by character",
    "reverse_words": "repeats the prompt's words in reverse order",
    "title": "repeats the prompt in Title Case",
}

EXAMPLE = "the quick brown fox"

# Per-adapter data differences, kept next to SKILL_TEXT so the cards stay truthful.
ADAPTER_DATA_NOTE = {
    "title": " For `title`, 30% of training prompts are random lowercase letter strings so that "
    "every letter's capital is seen at a word start.",
}

DATA_TEXT = (
    "Synthetic lowercase sentences of 1-6 words (at most 40 characters) from a seeded word list "
    f"({len(COMMON_WORDS)} common English words plus 1500 generated pseudo-words). Each example "
    "is `<s>{prompt}<sep>{target}</s>`, with the loss on `{target}</s>` only. The 200 held-out "
    "test prompts and the validation prompts used for early stopping are excluded from training."
)
BASE_DATA_TEXT = (
    " For the base only, 20% of training prompts are instead mixed-case, title-case, upper-case "
    "or random ASCII letters/digits/punctuation, so that repeating is a general byte copy and "
    "every ASCII token embedding is trained (adapters such as `upper` rely on that)."
)


def write_cards(
    out: Path, results: dict[str, dict[str, Any]], command: str, names: list[str]
) -> None:
    """Write README.md cards for the base, each adapter and the whole demo directory."""
    base = results.get("base", {})
    rows = []
    for name in ["base", *names]:
        r = results.get(name)
        if r is None:
            continue
        skill = str(r["skill"])
        ptype = r["peft_type"] or "- (base)"
        rows.append(
            f"| `{name}` | {ptype} | {SKILL_TEXT[skill]} | `{SKILLS[skill](EXAMPLE)}` "
            f"| {float(r['accuracy']):.1%} | {r['params']} | {r['steps']} |"
        )
        card_dir = out / "base" if name == "base" else out / "adapters" / name
        if not card_dir.exists():
            continue
        kind = "base model" if name == "base" else f"{ptype} adapter"
        stop = "100% twice in a row" if name == "base" else "at least 99%"
        (card_dir / "README.md").write_text(
            f"# peftserve demo {kind}: `{name}`\n\n"
            f"Greedy decoding of `<s>{{prompt}}<sep>` {SKILL_TEXT[skill]} and stops at `</s>`"
            f" (e.g. `{EXAMPLE}` -> `{SKILLS[skill](EXAMPLE)}`).\n\n"
            f"- Made by: `{command}` (seeded, CPU, float32, 2 threads).\n"
            f"- Data: {DATA_TEXT}"
            f"{BASE_DATA_TEXT if name == 'base' else ADAPTER_DATA_NOTE.get(name, '')}\n"
            f"- Held-out exact match (200 prompts, greedy `generate`): "
            f"**{float(r['accuracy']):.1%}**\n"
            f"- Training: {r['steps']} steps of batch 64, AdamW, early stop once validation "
            f"exact match is {stop} ({r['seconds']} s wall on 2 shared CPU cores).\n"
            + (
                f"- Architecture: {r['config']}, {r['params']} parameters, byte-level tokenizer "
                "(ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<sep>`=3, byte b = 4+b).\n"
                if name == "base"
                else f"- PEFT: {r['config']}; {r['params']} trainable parameters; "
                f"base `{BASE_REF}` (frozen, {base.get('params', '?')} parameters).\n"
            )
            + "\nThis is a toy for tests and demos, not a language model.\n"
        )
    table = "\n".join(rows)
    (out / "README.md").write_text(
        "# peftserve demo model\n\n"
        "A tiny Llama (`LlamaForCausalLM`, hidden 128, 4 layers, 4 heads, intermediate 384, "
        f"tied embeddings, {base.get('params', '?')} parameters, float32, safetensors) whose only "
        "skill is to repeat its prompt, plus PEFT adapters that each change that skill visibly, "
        "so a test can tell from the output text which adapter served a request.\n\n"
        "The tokenizer is byte-level (256 byte tokens plus `<pad>`=0, `<s>`=1, `</s>`=2, "
        "`<sep>`=3; byte b has id 4+b), so multi-byte UTF-8 characters span several tokens. "
        "`tokenizer(prompt)` yields `<s> prompt <sep>`, the exact prefix the model expects; "
        "generation ends with `</s>`.\n\n"
        "| name | PEFT type | skill | `the quick brown fox` -> | held-out exact match | "
        "trained params | steps |\n|---|---|---|---|---|---|---|\n"
        f"{table}\n\n"
        "Accuracy is greedy `PeftModel.generate` on 200 held-out prompts.\n\n"
        f"Data: {DATA_TEXT}{BASE_DATA_TEXT}{''.join(ADAPTER_DATA_NOTE.values())}\n\n"
        "Only ASCII was ever trained: the tokenizer handles any UTF-8, but the model does not "
        "repeat non-ASCII text faithfully.\n\n"
        "PEFT cannot hold adapters of different types in one `PeftModel` (`load_adapter` of the "
        "LoHa `title` into a model holding the LoRA `upper` raises `Cannot combine adapters with "
        "different peft types`); load `title` on its own base copy.\n\n"
        "Layout: `base/` (config, weights, tokenizer, generation config) and "
        "`adapters/<name>/`; load with `AutoModelForCausalLM.from_pretrained('models/demo/base')`"
        " and `PeftModel.from_pretrained(base, 'models/demo/adapters/upper')`.\n\n"
        f"Reproduce (about 15 minutes on 2 CPU cores):\n\n    {command}\n"
    )


if __name__ == "__main__":
    main()
