"""`ChatTokenizer` (backends/local/chat_tokenizer.py) against transformers' fast tokenizer on the same files.

The bundled SmolLM2's cached tokenizer is read both ways and must encode, decode and render chat templates
identically: its own template, and templates in the styles of other model families (BOS tokens, role checks
that raise, tools and `tojson`, namespaces and loop controls, `{% generation %}`). An entry either reader
would load differently is refused (None), so the loader falls back to transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

from backends.local import model_cache  # noqa: E402
from backends.local.chat_tokenizer import ChatTokenizer  # noqa: E402
from backends.local.loader import DEFAULT_MODEL_SPEC, load_engine_model, resolve_spec  # noqa: E402
from backends.local.wire import ApiError, encode_chat  # noqa: E402

pytestmark = pytest.mark.model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

TEXTS = [
    "Say hello in five words.",
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "naïve café, 日本語のテキスト, emoji 👩‍💻🚀, Ελληνικά",
    "<|im_start|>system\nspecial tokens written as text<|im_end|>",
    "<|endoftext|><|im_end|>",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # code",
    "a" * 300 + " " + "zz " * 50,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "  Another, with spaces  "},
    ],
    [{"role": "user", "content": "emoji 🚀 and <|im_end|> inside"}],
    [{"role": "user", "content": "a key set to None is dropped", "name": None}],
]

# Templates written in the styles hub models use, each exercising a feature of transformers' environment.
TEMPLATES = {
    "bos-and-strip": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alternation-check": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if loop.index0 == 0 and system %}{% set content = system + '\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% else %}{{ ' ' + content.strip() + eos_token }}{% endif %}{% endfor %}"
    ),
    "tools-and-tojson": (
        "{% if tools is not none %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson(indent=2)) }}"
        "{% elif messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nDefault<|im_end|>\\n' }}"
        "{% endif %}"
        "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' }}"
        "{{ message | tojson }}{{ {'k': 'é<>&'} | tojson }}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if documents is defined and documents is none %}docs-none{% endif %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "namespace-and-loop-controls": (
        "{% set ns = namespace(users=0, last=none) %}"
        "{% for message in messages %}{% if message.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.users = ns.users + (1 if message.role == 'user' else 0) %}{% set ns.last = message.role %}"
        "{{ loop.index }}:{{ message.role }}:{{ message.content }}\n"
        "{% if ns.users > 1 %}{% break %}{% endif %}{% endfor %}"
        "users={{ ns.users }} last={{ ns.last }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') | length }}\n"
        "  {% if add_generation_prompt %}\n  assistant:{% endif %}"
    ),
    "generation-tag": (
        "{% for message in messages %}{% if message.role == 'assistant' %}"
        "{% generation %}{{ message.content + eos_token }}{% endgeneration %}"
        "{% else %}{{ message.role + ': ' + message.content + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    ),
}


@pytest.fixture(scope="module")
def entry() -> Path:
    """The bundled model's cached tokenizer entry (converted on first use)."""
    loaded = load_engine_model(DEFAULT_MODEL_SPEC)
    loaded.weights.close()
    source = resolve_spec(DEFAULT_MODEL_SPEC)
    assert source.gguf_file is not None
    gguf = source.directory / source.gguf_file
    root = model_cache.default_cache_root()
    full = model_cache.entry_path(gguf, root)
    return full if model_cache.is_complete(full) else model_cache.metadata_entry_path(gguf, root)


def a_copy(entry: Path, directory: Path, **config: Any) -> Path:
    """The entry's tokenizer files in `directory`, tokenizer_config.json updated with `config`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (entry / name).exists():
            shutil.copy(entry / name, directory / name)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return directory


def both(directory: Path) -> tuple[ChatTokenizer, Any]:
    ours = ChatTokenizer.read(directory)
    assert ours is not None
    return ours, transformers.PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)


def test_the_bundled_tokenizer_encodes_and_decodes_as_transformers_does(entry: Path) -> None:
    ours, theirs = both(entry)
    assert ours.eos_token_id == theirs.eos_token_id is not None
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template
    for text in TEXTS:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
    vocab = theirs.vocab_size
    samples = [theirs.encode(text) for text in TEXTS] + [[0, 1, 2, 3], list(range(vocab - 50, vocab))]
    samples.append([(i * 7919) % len(theirs) for i in range(400)])  # added tokens among ordinary ones
    for ids in samples:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_the_bundled_chat_template_renders_as_transformers_does(entry: Path) -> None:
    ours, theirs = both(entry)
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            expected = theirs.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=False)
            assert ours.render(conversation, add_generation_prompt=prompt) == expected
            ids = theirs.apply_chat_template(conversation, add_generation_prompt=prompt, return_dict=True)
            assert encode_chat(ours, conversation, add_generation_prompt=prompt) == list(ids["input_ids"])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("where", ["config", "file"])
def test_templates_of_other_families_render_as_transformers_does(
    entry: Path, tmp_path: Path, name: str, where: str
) -> None:
    if where == "config":
        directory = a_copy(entry, tmp_path / "tok", chat_template=TEMPLATES[name])
        (directory / "chat_template.jinja").unlink()
    else:
        directory = a_copy(entry, tmp_path / "tok")
        (directory / "chat_template.jinja").write_text(TEMPLATES[name])
    ours, theirs = both(directory)
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            try:
                expected = theirs.apply_chat_template(
                    conversation, add_generation_prompt=prompt, tokenize=False
                )
            except jinja2.TemplateError as exc:
                with pytest.raises(jinja2.TemplateError, match=str(exc)[:40]):
                    ours.render(conversation, add_generation_prompt=prompt)
                continue
            assert ours.render(conversation, add_generation_prompt=prompt) == expected
            ids = theirs.apply_chat_template(conversation, add_generation_prompt=prompt)["input_ids"]
            assert ours.apply_chat_template(conversation, add_generation_prompt=prompt)["input_ids"] == ids


def test_a_template_that_refuses_the_messages_is_a_clear_400(entry: Path, tmp_path: Path) -> None:
    directory = a_copy(entry, tmp_path / "tok")
    (directory / "chat_template.jinja").write_text(TEMPLATES["alternation-check"])
    ours = ChatTokenizer.read(directory)
    assert ours is not None
    two_users = [{"role": "user", "content": "secret prompt"}, {"role": "user", "content": "again"}]
    with pytest.raises(ApiError) as caught:
        encode_chat(ours, two_users)
    assert caught.value.status_code == 400 and caught.value.param == "messages"
    assert "roles must alternate" in caught.value.message and "secret prompt" not in caught.value.message


def test_the_sandbox_refuses_what_transformers_refuses(entry: Path, tmp_path: Path) -> None:
    directory = a_copy(entry, tmp_path / "tok")
    (directory / "chat_template.jinja").write_text(
        "{% set ns = namespace() %}{% set ns._hidden = 1 %}{{ messages.__class__.__mro__ }}"
    )
    ours = ChatTokenizer.read(directory)
    assert ours is not None
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.render(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer_class": "LlamaTokenizer"},
        {"add_bos_token": True},
        {"add_prefix_space": True},
        {"clean_up_tokenization_spaces": True},
        {"backend": "sentencepiece"},
        {"bos_token": "<not-a-special-token>"},
        {"chat_template": [{"name": "default", "template": "{{ messages }}"}]},
        {"chat_template": "{{ messages }}"},  # and chat_template.jinja: which one wins is transformers' call
    ],
    ids=lambda change: next(iter(change)),
)
def test_an_entry_served_differently_by_transformers_is_refused(
    entry: Path, tmp_path: Path, change: dict[str, Any]
) -> None:
    directory = a_copy(entry, tmp_path / "tok", **change)
    if not (directory / "chat_template.jinja").exists():
        (directory / "chat_template.jinja").write_text("{{ messages }}")
    assert ChatTokenizer.read(directory) is None
    assert ChatTokenizer.read(a_copy(entry, tmp_path / "plain")) is not None
