"""A cached model's tokenizer and chat template, served without transformers.

The engine keeps its tokenizer for the life of the process and asks four things of it: encode, decode, the
end-of-sequence id and the chat template. Through transformers (`PreTrainedTokenizerFast.apply_chat_template`)
those also keep transformers' base modules resident, ~40 MB of the engine's idle memory. `ChatTokenizer` does
the four over the same `tokenizer.json` with the library transformers itself calls (`tokenizers`), and renders
the template in the environment transformers builds for it (`chat_template_utils._compile_jinja_template`):
jinja2's immutable sandbox with trim_blocks, lstrip_blocks and loop controls, and transformers' `tojson`,
`raise_exception`, `strftime_now`, `dict`, `namespace` and `{% generation %}`; the template sees the messages,
`tools` and `documents` (None), `add_generation_prompt` and the named special tokens.

`ChatTokenizer.read` answers only for an entry it serves exactly as transformers would, and None for any other
(the caller loads that one through transformers): a tokenizer_config.json key it does not know, a named
special token that is not a special added token of tokenizer.json, templates chosen by name, or settings that
change encoding or decoding (`add_bos_token`, `add_prefix_space`, `clean_up_tokenization_spaces`). Tests
compare the two on the bundled model and on templates from other families.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`): each is passed to the template by name.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# tokenizer_config.json keys that change nothing this class does (bookkeeping, padding and truncation sides
# for batches it never makes, the length transformers only warns about).
_INERT_CONFIG_KEYS = frozenset(
    {
        "backend",
        "tokenizer_class",
        "is_local",
        "local_files_only",
        "model_max_length",
        "padding_side",
        "truncation_side",
        "model_input_names",
        "chat_template",
    }
)
TEMPLATE_FILE = "chat_template.jinja"
# Tokenizer classes that are `PreTrainedTokenizerFast` itself (transformers 5 names it `TokenizersBackend`):
# the class every GGUF tokenizer converts to, and the only one whose behaviour is all in tokenizer.json.
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class ChatTokenizer:
    """Encode, decode and apply a chat template as transformers' fast tokenizer does, without transformers."""

    def __init__(self, backend: Any, chat_template: str, special_tokens: Mapping[str, str]) -> None:
        self._backend = backend  # a tokenizers.Tokenizer
        self.chat_template = chat_template
        self.special_tokens_map = dict(special_tokens)
        self._template = compile_template(chat_template)
        eos = self.special_tokens_map.get("eos_token")
        pad = self.special_tokens_map.get("pad_token")
        self.eos_token_id: int | None = backend.token_to_id(eos) if eos is not None else None
        self.pad_token_id: int | None = backend.token_to_id(pad) if pad is not None else None

    @classmethod
    def read(cls, entry: Path) -> ChatTokenizer | None:
        """The tokenizer saved in `entry` (tokenizer.json, tokenizer_config.json, the template), or None when
        transformers would load it differently than this class serves it."""
        from tokenizers import Tokenizer

        try:
            config = json.loads((entry / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or not (entry / "tokenizer.json").is_file():
            return None
        if config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES:
            return None
        if config.get("backend", "tokenizers") != "tokenizers" or config.get("clean_up_tokenization_spaces"):
            return None
        config.pop("clean_up_tokenization_spaces", None)
        if config.get("extra_special_tokens") in ([], {}):
            del config["extra_special_tokens"]
        if set(config) - _INERT_CONFIG_KEYS - set(SPECIAL_TOKEN_NAMES):
            return None
        template = _single_template(entry, config.get("chat_template"))
        if template is None:
            return None
        backend = Tokenizer.from_file(str(entry / "tokenizer.json"))
        special = _special_tokens(config, backend)
        if special is None:
            return None
        return cls(backend, template, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return str(self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages` (keys set to None dropped, as transformers does)."""
        chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return self._template.render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )

    def apply_chat_template(
        self,
        conversation: Iterable[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = True,
    ) -> Any:
        """transformers' signature for what the engine calls: the text, its ids, or {"input_ids": ids}."""
        text = self.render(conversation, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids


def _single_template(entry: Path, configured: Any) -> str | None:
    """The one template transformers would apply without tools: tokenizer_config's string or the .jinja file
    (never both, never named templates, which the caller leaves to transformers)."""
    path = entry / TEMPLATE_FILE
    if (entry / "chat_template.json").exists() or (entry / "additional_chat_templates").exists():
        return None
    if path.is_file():
        return None if configured is not None else path.read_text()
    return configured if isinstance(configured, str) else None


def _special_tokens(config: Mapping[str, Any], backend: Any) -> dict[str, str] | None:
    """The named special tokens as strings, each one a special added token of tokenizer.json (else None:
    transformers would add it to the vocabulary, which changes encoding)."""
    added = {token.content: token.special for token in backend.get_added_tokens_decoder().values()}
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str) or added.get(value) is not True:
            return None
        special[name] = value
    return special


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it (for its training
    masks); rendering a prompt keeps the body as it is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """`dict` inside a template: builds dicts, and offers no attributes to reach past the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's Namespace takes self this way
        self, rest = args[0], args[1:]
        attributes = dict(*rest, **kwargs)
        for name in attributes:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


def compile_template(source: str) -> jinja2.Template:
    """`source` compiled in a chat template's environment (see the module docstring)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment.from_string(source)
