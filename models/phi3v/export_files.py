"""The files around the weights of a hub-layout Phi-3-V folder, as the hub checkpoints ship them.

`write_hub_files(folder, ...)` turns what `Phi3VForCausalLM.save_pretrained` + `Phi3VProcessor.save_pretrained`
wrote (transformers 5.x shapes) into the files of the hub checkpoint, so that the official remote code on its pinned
stack (transformers 4.40.2, tokenizers 0.19.1) and vLLM (`--trust-remote-code`) read the folder:

- `config.json`: `auto_map` naming the base model's remote code on the hub (`<repo>--configuration_phi3_v.Phi3VConfig`,
  so that the folder needs no Python files of its own), `torch_dtype` instead of `dtype`;
- `generation_config.json`: the stop ids (`<|end|>`, `<|endoftext|>`), not the config's `eos_token_id` 2;
- `preprocessor_config.json` (+ `processor_config.json` for Phi-3.5) with the hub's `auto_map` and the `num_crops`
  the processor was given (the one training used);
- tokenizer files: the base checkpoint's own files byte for byte when they are in the old format, else a
  `tokenizer.json` whose BPE `merges` are "a b" strings (tokenizers < 0.20 reads no pairs) and a hub-shaped
  `tokenizer_config.json` (`LlamaTokenizer`, chat template inside) and `special_tokens_map.json`.

`hub_layout_problems(folder)` checks a folder against these rules (used by export as a self-check, and by tests).
What differs from the hub's files and why: docs/export.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PHI3_VISION = "microsoft/Phi-3-vision-128k-instruct"
PHI35_VISION = "microsoft/Phi-3.5-vision-instruct"
# Where each model's remote code lives on the hub (its own files, named as its own config.json names them).
REMOTE_CODE = {
    PHI3_VISION: {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    },
    PHI35_VISION: {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
    },
}
END_TOKENS = ("<|end|>", "<|endoftext|>")
HUB_END_TOKEN_IDS = [32007, 32000]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# Fields tokenizers 0.19's BPE deserialiser reads, with their JSON types (None: null allowed); it skips unknown
# fields, but merges must be "a b" strings (pairs arrived in 0.20): docs/export.md#tokenizer-files.
OLD_BPE_FIELDS = {
    "type": (str,),
    "dropout": (float, type(None)),
    "unk_token": (str, type(None)),
    "continuing_subword_prefix": (str, type(None)),
    "end_of_word_suffix": (str, type(None)),
    "fuse_unk": (bool,),
    "byte_fallback": (bool,),
    "ignore_merges": (bool,),
    "vocab": (dict,),
    "merges": (list,),
}


def remote_code_repo(base: str | None, config: dict) -> str:
    """The hub repository whose remote code reads this model: the base's own when it is one of the two, else told
    apart by `sliding_window` (Phi-3.5-vision: 262144), else Phi-3-vision's."""
    text = (base or "").lower()
    if "3.5-vision" in text or "3_5" in text or config.get("sliding_window") == 262144:
        return PHI35_VISION
    return PHI3_VISION


def end_token_ids(config: dict) -> list[int]:
    return list(config.get("end_token_ids") or HUB_END_TOKEN_IDS)


def remote_map(repo: str, *keys: str) -> dict[str, str]:
    return {key: f"{repo}--{REMOTE_CODE[repo][key]}" for key in keys}


# ------------------------------------------------------------------------------------------------ writing


def write_processor_files(folder: Path, *, remote_repo: str) -> None:
    """The processor's `auto_map` (and Phi-3.5's processor_config.json), so that the old stack's
    `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` finds the hub's processor, not a bare tokenizer:
    merged folders and adapter folders alike."""
    pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    pre = {"auto_map": remote_map(remote_repo, "AutoProcessor", "AutoImageProcessor"), **pre}
    write_json(folder / "preprocessor_config.json", pre)
    if remote_repo == PHI35_VISION:
        write_json(
            folder / "processor_config.json",
            {"auto_map": remote_map(remote_repo, "AutoProcessor"), "processor_class": "Phi3VProcessor"},
        )


def write_hub_files(folder: Path, *, remote_repo: str, base_folder: Path | None = None) -> None:
    """Rewrite the non-weight files of `folder` (a fresh save_pretrained of model and processor) into the hub's."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config["auto_map"] = remote_map(remote_repo, "AutoConfig", "AutoModelForCausalLM")
    config.pop("_attn_implementation", None)
    write_json(folder / "config.json", config)

    generation = {
        "_from_model_config": False,
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": end_token_ids(config),
        "pad_token_id": config.get("pad_token_id") or 32000,
        "transformers_version": config.get("transformers_version"),
    }
    write_json(folder / "generation_config.json", generation)

    write_processor_files(folder, remote_repo=remote_repo)

    if (
        base_folder is not None
        and old_stack_tokenizer(Path(base_folder))
        and same_tokenizer(Path(base_folder), folder)
    ):
        for name in TOKENIZER_FILES:
            if (Path(base_folder) / name).is_file():
                shutil.copyfile(Path(base_folder) / name, folder / name)  # byte for byte
    else:
        write_old_stack_tokenizer(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # in tokenizer_config.json, where 4.40 reads it


def write_json(path: Path, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def old_stack_tokenizer(folder: Path) -> bool:
    """True when `folder`'s tokenizer files are already what transformers 4.40 / tokenizers 0.19 read."""
    try:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        not old_tokenizers_problems(spec)
        and tok_config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast")
        and "chat_template" in tok_config
        and (folder / "special_tokens_map.json").is_file()
    )


def same_tokenizer(base: Path, folder: Path) -> bool:
    """The base's vocabulary and added tokens are the ones just saved (so copying its files changes nothing)."""
    a = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    b = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return a["model"]["vocab"] == b["model"]["vocab"] and [t["content"] for t in a["added_tokens"]] == [
        t["content"] for t in b["added_tokens"]
    ]


def write_old_stack_tokenizer(folder: Path) -> None:
    """tokenizer.json with "a b" merges; tokenizer_config.json / special_tokens_map.json in the hub's shape."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    merges = spec["model"].get("merges", [])
    joined = []
    for merge in merges:
        if isinstance(merge, str):
            joined.append(merge)
            continue
        if any(" " in part for part in merge):
            raise ValueError(
                f"merge {merge!r} holds a space: it cannot be written as an 'a b' string for tokenizers < 0.20"
            )
        joined.append(" ".join(merge))
    spec["model"]["merges"] = joined
    spec["model"] = {k: v for k, v in spec["model"].items() if k in OLD_BPE_FIELDS}
    write_json(folder / "tokenizer.json", spec)

    tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template_file = folder / "chat_template.jinja"
    template = tok_config.get("chat_template") or (
        template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    )
    special = {t["content"] for t in spec["added_tokens"] if t.get("special")}
    extra = [
        t for t in ("<|system|>", "<|end|>", "<|user|>", "<|end|>") if t in special
    ]  # as the hub lists them
    out = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {
                k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
            }
            for t in spec["added_tokens"]
        },
        "additional_special_tokens": extra,
        "bos_token": tok_config.get("bos_token", "<s>"),
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tok_config.get("eos_token", "<|endoftext|>"),
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": tok_config.get("pad_token", "<|endoftext|>"),
        "padding_side": tok_config.get("padding_side", "right"),
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": tok_config.get("unk_token", "<unk>"),
        "use_default_system_prompt": False,
    }
    write_json(folder / "tokenizer_config.json", out)

    def token(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": extra,
            "bos_token": token(out["bos_token"]),
            "eos_token": token(out["eos_token"]),
            "pad_token": token(out["pad_token"]),
            "unk_token": token(out["unk_token"]),
        },
    )
    template_file.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ checking


def old_tokenizers_problems(spec: dict) -> list[str]:
    """What tokenizers 0.19.1 would refuse in a tokenizer.json's `model` (a BPE): fields of the wrong JSON type,
    merges that are not "a b" strings (the "untagged enum ModelWrapper" error)."""
    model = spec.get("model", {})
    problems = []
    if model.get("type") != "BPE":
        return [f"model.type is {model.get('type')!r}, not BPE"]
    for key, value in model.items():
        if key in OLD_BPE_FIELDS and type(value) not in OLD_BPE_FIELDS[key]:
            problems.append(
                f"model.{key}: {type(value).__name__} where tokenizers 0.19 reads {OLD_BPE_FIELDS[key]}"
            )
    merges = model.get("merges", [])
    bad = [m for m in merges if not (isinstance(m, str) and len(m.split(" ")) == 2)]
    if bad:
        problems.append(f"model.merges: {len(bad)} entries are not 'a b' strings, e.g. {bad[0]!r}")
    vocab = model.get("vocab", {})
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        problems.append("model.vocab: not a map of token -> int id")
    return problems


def hub_layout_problems(folder: Path) -> list[str]:
    """Every way `folder` departs from the hub checkpoint's files (empty list: none)."""
    folder = Path(folder)
    problems = []
    required = [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    problems += [f"{name} is missing" for name in required if not (folder / name).is_file()]
    if problems:
        return problems
    read = lambda name: json.loads((folder / name).read_text(encoding="utf-8"))  # noqa: E731
    config = read("config.json")
    if "dtype" in config or "torch_dtype" not in config:
        problems.append("config.json: writes dtype, not torch_dtype")
    auto_map = config.get("auto_map", {})
    for key, module in (
        ("AutoConfig", "configuration_phi3_v.Phi3VConfig"),
        ("AutoModelForCausalLM", "modeling_phi3_v.Phi3VForCausalLM"),
    ):
        if not auto_map.get(key, "").endswith(module):
            problems.append(f"config.json: auto_map.{key} is {auto_map.get(key)!r}, not ...{module}")
    if config.get("rope_scaling") and config["rope_scaling"].get("type") != "su":
        problems.append("config.json: rope_scaling.type is not 'su'")
    if config.get("architectures") != ["Phi3VForCausalLM"] or config.get("model_type") != "phi3_v":
        problems.append("config.json: architectures/model_type are not Phi3VForCausalLM/phi3_v")
    eos = read("generation_config.json").get("eos_token_id")
    if sorted(eos if isinstance(eos, list) else [eos]) != sorted(end_token_ids(config)):
        problems.append(
            f"generation_config.json: eos_token_id {eos} is not the stop ids {end_token_ids(config)}"
        )
    pre = read("preprocessor_config.json")
    if set(pre.get("auto_map", {})) != {"AutoProcessor", "AutoImageProcessor"}:
        problems.append("preprocessor_config.json: no auto_map for AutoProcessor and AutoImageProcessor")
    if not isinstance(pre.get("num_crops"), int):
        problems.append("preprocessor_config.json: no num_crops")
    problems += [f"tokenizer.json: {p}" for p in old_tokenizers_problems(read("tokenizer.json"))]
    tok_config = read("tokenizer_config.json")
    if tok_config.get("tokenizer_class") not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        problems.append(
            f"tokenizer_config.json: tokenizer_class {tok_config.get('tokenizer_class')!r} is unknown to "
            "transformers 4.40"
        )
    if not tok_config.get("chat_template"):
        problems.append("tokenizer_config.json: no chat_template (transformers 4.40 reads it there)")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        problems.append("no safetensors weights")
    elif len(weights) > 1 and not (folder / "model.safetensors.index.json").is_file():
        problems.append("sharded weights without model.safetensors.index.json")
    return problems
