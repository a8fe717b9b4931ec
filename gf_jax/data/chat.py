"""Chat templates: a conversation rendered to text exactly as ``transformers`` renders it, and the
character spans of its assistant turns (the text a fine-tune supervises).

The template is the tokenizer's own (``chat_template`` in ``tokenizer_config.json``, or a
``chat_template.jinja`` beside it) or a built-in one by name (``data.chat_template``). Rendering
follows ``transformers.utils.chat_template_utils``: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the globals ``raise_exception`` and ``strftime_now``, the
``tojson`` filter, and ``bos_token`` / ``eos_token`` plus ``add_generation_prompt`` as variables.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Sequence

ROLES = ("system", "user", "assistant", "tool")

# Built-in templates for tokenizers that ship none (texts as in the models' published templates).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


def tokenizer_chat_template(tokenizer) -> str | None:
    """The chat template saved with a tokenizer (None when it has none).

    Looks beside the tokenizer's file: ``chat_template.jinja`` (newer transformers save it there),
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of
    which ``default`` is the one ``apply_chat_template`` uses).
    """
    directory = os.path.dirname(os.path.abspath(tokenizer.path or "."))
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def resolve_template(tokenizer, name: str) -> str:
    """The template text: built-in ``name``, a ``.jinja`` file ``name``, or (``name`` == "") the
    tokenizer's own."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if name.endswith(".jinja") and os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return f.read()
    if name:
        raise ValueError(f"data.chat_template={name!r} is neither a built-in template "
                         f"({', '.join(BUILTIN_TEMPLATES)}) nor a .jinja file; pick one of those or leave it empty.")
    template = tokenizer_chat_template(tokenizer)
    if template is None:
        raise ValueError(f"the tokenizer {tokenizer.path!r} has no chat_template; set data.chat_template to one of "
                         f"{', '.join(BUILTIN_TEMPLATES)} (or a .jinja file).")
    return template


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The jinja2 template, compiled in the environment transformers uses."""
    # chat templates only
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers): rendered
        as its body; the assistant spans are found by incremental rendering instead."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[dict], special_tokens: dict[str, str],
                add_generation_prompt: bool = False) -> str:
    """The conversation as text (``special_tokens``: ``bos_token``, ``eos_token``, ... as strings)."""
    return compile_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                             **special_tokens)


def assistant_spans(template: str, messages: Sequence[dict], special_tokens: dict[str, str]
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant turn]).

    A turn's span is what rendering it adds after the conversation before it plus the generation
    prompt: the reply and its end-of-turn marker (what the model must learn to produce), not the
    role header (unless the template writes that differently from its generation prompt). Needs a
    template that renders a conversation's beginning as a prefix of the whole (every common
    template does); else a ValueError.
    """
    full = render_chat(template, messages, special_tokens)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render_chat(template, messages[: i + 1], special_tokens)
        before = render_chat(template, messages[:i], special_tokens, add_generation_prompt=True) if i else ""
        if not upto.startswith(before):  # the generation prompt differs from the turn's header:
            before = render_chat(template, messages[:i], special_tokens)  # supervise the header too
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("the chat template does not render a conversation's first turns as a prefix of the "
                             "whole, so assistant turns cannot be located; set data.chat_template to a built-in one.")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans
