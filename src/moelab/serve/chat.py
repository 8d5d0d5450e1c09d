"""Chat prompts: the checkpoint's own chat template, or a plain fallback; end tokens.

A Hugging Face checkpoint keeps its chat template as jinja2, either in a
``chat_template.jinja`` file or as ``"chat_template"`` in ``tokenizer_config.json``, beside
``tokenizer.json``. It is rendered as transformers' ``apply_chat_template`` does: a
sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and
``strftime_now`` available, ``add_generation_prompt=True`` and the special tokens (``bos_token``,
``eos_token``, ...) from the config; the text is then tokenized without adding special tokens
(the template writes them itself).

Without a template (a moelab run trained on plain text), `PLAIN_TEMPLATE` writes one
``<role>: <content>`` line per message and ends with ``assistant:``. A base model has no
chat tokens; a plain transcript is the dialogue shape it has most likely seen in its
training text, it needs no token the tokenizer lacks, and ``assistant:`` hands the model
the assistant's turn. Such a model will happily go on to write the user's next turn, so
the fallback also stops on ``"\\nuser:"`` (`PLAIN_STOP`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PLAIN_STOP = ("\nuser:",)


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the jinja2 text
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
    origin: str  # where it came from (a file path, or "plain")

    @property
    def is_plain(self) -> bool:
        return self.origin == "plain"

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages` (``[{"role", "content"}]``), ending where the assistant writes."""
        return _compile(self.source).render(messages=messages, add_generation_prompt=True, **self.special_tokens)


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def load_chat_template(tokenizer_path: Path | None) -> ChatTemplate:
    """The chat template beside `tokenizer_path` (``chat_template.jinja`` or the
    ``tokenizer_config.json`` entry), else the plain fallback."""
    if tokenizer_path is None:
        return plain_template()
    folder = Path(tokenizer_path).parent
    cfg: dict = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s: unreadable (%s); using the plain chat template", cfg_path, e)
    special = {k: t for k, v in cfg.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
    jinja_path = folder / "chat_template.jinja"
    source, origin = None, None
    if jinja_path.is_file():
        source, origin = jinja_path.read_text(), str(jinja_path)
    else:
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if isinstance(tpl, str):
            source, origin = tpl, str(cfg_path)
    if source is None:
        return plain_template()
    _compile(source)  # a broken template fails at startup, not on the first request
    return ChatTemplate(source, special, origin)


def plain_template() -> ChatTemplate:
    return ChatTemplate(PLAIN_TEMPLATE, {}, "plain")


_COMPILED: dict[str, object] = {}


def _compile(source: str):
    if source not in _COMPILED:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]
