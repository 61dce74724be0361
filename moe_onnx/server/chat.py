"""Chat templates rendered the way transformers' ``apply_chat_template`` renders them.

The template comes from the export's ``chat_template.jinja`` (transformers' own file, which wins)
or the ``chat_template`` of ``tokenizer_config.json`` (a string, or named templates of which
``default`` is taken). Rendering follows transformers: an immutable sandboxed jinja2 environment
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and a no-op
``{% generation %}`` block, the globals ``raise_exception``, ``strftime_now``, ``namespace`` (no
underscore attributes) and ``dict``, a ``tojson`` that does not escape HTML, and the tokenizer's
special tokens (``bos_token``, ``eos_token``...) as variables beside ``messages``,
``add_generation_prompt``, ``tools`` and ``documents``. The rendered text is tokenized without
adding special tokens: the template places BOS itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moe_onnx.errors import MoeOnnxError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (``raise_exception``) or failed while rendering."""


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str = "template"):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as err:
            raise MoeOnnxError(f"the chat template in {origin} does not compile: {err}") from None
        self.special_tokens = special_tokens

    @classmethod
    def find(cls, folder: Path) -> ChatTemplate | None:
        """The export's template, or None when it has none."""
        config = _read_json(folder / "tokenizer_config.json")
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            source, origin = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        else:
            source, origin = _template_from_config(config), str(folder / "tokenizer_config.json")
        if not source:
            return None
        special = {**_special_tokens(_read_json(folder / "special_tokens_map.json")),
                   **_special_tokens(config)}
        return cls(source, special, origin)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **variables) -> str:
        """The prompt text for ``messages`` (dicts with role and content); ``variables`` are the
        template's too (``chat_template_kwargs``), beside the special tokens."""
        context = {**self.special_tokens, "tools": None, "documents": None, **variables,
                   "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(context)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(str(err)) from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            # the template met a value of a type it did not expect; say what, not where in Python
            raise ChatTemplateError(str(err)) from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise MoeOnnxError(f"{path} is not valid JSON") from None
    return value if isinstance(value, dict) else {}


def _template_from_config(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _special_tokens(config: dict) -> dict[str, str]:
    """``bos_token`` and friends as text; transformers stores them as strings or AddedToken dicts."""
    tokens = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; rendering for inference keeps the body as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace without underscore attributes (no way into CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja2's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` in templates, without the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace, dict=_Dict())
    return env
