"""Native Kimi tokenizer (tiktoken BPE + Kimi special tokens) and the chat template.

No `trust_remote_code`: a Kimi checkpoint ships
  * tiktoken.model: one `base64(token bytes) rank` line per base token;
  * tokenizer_config.json: special tokens (`added_tokens_decoder`), bos/eos/pad names and
    maybe `chat_template`;
  * maybe chat_template.jinja (preferred over the config's template, as in transformers).

Special token ids follow the base ranks: base..base+255, named from `added_tokens_decoder`,
the rest `<|reserved_token_{id}|>`.

Safety rule: text is never turned into special tokens unless the caller asks
(`encode(..., allow_special=True)`). `apply_chat_template` honours the specials that the
template itself writes but keeps special-looking text inside messages as plain text.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Collection, Union

import tiktoken

__all__ = ["KIMI_PAT_STR", "DEFAULT_CHAT_TEMPLATE", "KimiTokenizer", "StreamingDetokenizer",
           "TokenizerError", "load_tokenizer"]

# Kimi's pre-tokenizer split pattern (data; see KIMI_LINEAR_FACTS.md). The `&&` class
# intersections need tiktoken's regex engine: Python's `re` would read them literally.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED_SPECIAL = 256

# Long-input splitting, as the reference tokenizer does: BPE cost grows badly with piece length,
# so inputs are cut every 400k characters and inside runs of more than 25k whitespace or
# non-whitespace characters.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# The published Kimi K2 chat format, used when the checkpoint ships no template.
DEFAULT_CHAT_TEMPLATE = """\
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>
  {%- endif -%}
  {%- set role = message['role'] -%}
  {%- if role == 'system' -%}<|im_system|>
  {%- elif role == 'user' -%}<|im_user|>
  {%- elif role == 'assistant' -%}<|im_assistant|>
  {%- else -%}<|im_system|>
  {%- endif -%}
  {{- message.get('name') or role -}}<|im_middle|>
  {%- set content = message['content'] -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part['type'] == 'text' -%}
        {{- part['text'] -}}
      {%- else -%}
        {{- raise_exception('only text content parts are supported, got ' ~ part['type']) -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or the chat template failed."""


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
def _b64decode(s: bytes) -> bytes:
    try:
        return binascii.a2b_base64(s, strict_mode=True)  # Python >= 3.11: strict and fast
    except TypeError:  # pragma: no cover - Python 3.10
        return base64.b64decode(s, validate=True)


def _read_ranks(path: Path) -> tuple[dict[bytes, int], str]:
    """Parse tiktoken.model -> ({token bytes: rank}, sha256 of the vocabulary in rank order)."""
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (a Kimi checkpoint ships tiktoken.model)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: unreadable ({e})") from None
    ranks: dict[bytes, int] = {}
    b64_by_rank: dict[int, bytes] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        parts = line.split()
        if len(parts) != 2:
            if not parts:  # blank lines are tolerated, as tiktoken does
                continue
            raise TokenizerError(f"{path}:{lineno}: malformed line, expected 'base64 rank', "
                                 f"got {line[:60]!r}")
        b64, rank_text = parts
        try:
            tok = _b64decode(b64)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{path}:{lineno}: invalid base64 token {b64[:60]!r}") from None
        try:
            rank = int(rank_text)
        except ValueError:
            raise TokenizerError(f"{path}:{lineno}: invalid rank {rank_text[:30]!r}") from None
        if not tok:
            raise TokenizerError(f"{path}:{lineno}: empty token")
        if rank < 0 or rank in b64_by_rank:
            raise TokenizerError(f"{path}:{lineno}: rank {rank} is negative or repeated")
        if tok in ranks:
            raise TokenizerError(f"{path}:{lineno}: token {tok!r} repeated (also rank {ranks[tok]})")
        ranks[tok] = rank
        b64_by_rank[rank] = b64
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    # special ids start at the base count, so the ranks must be exactly 0..n-1
    top = max(b64_by_rank)
    if top != len(ranks) - 1:
        raise TokenizerError(f"{path}: ranks are not contiguous 0..{len(ranks) - 1} (max rank {top})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE must be able to encode any byte
        raise TokenizerError(f"{path}: single-byte tokens missing, e.g. byte {missing[0]}")
    # digest of a canonical form, so line endings or line order in the file don't matter
    digest = hashlib.sha256(b"\n".join(b64_by_rank[r] for r in range(len(ranks)))).hexdigest()
    return ranks, digest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_name(value: Any) -> str | None:
    """A special-token field: a string or an AddedToken-style dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(cfg: dict, cfg_path: Path, n_base: int, vocab_size: int | None = None) -> dict[str, int]:
    """Special names -> ids from base..; `vocab_size` (config.json's), when known, bounds the ids
    (else the NUM_RESERVED_SPECIAL reserved ids after the base ranks do)."""
    if vocab_size is not None and vocab_size > n_base:
        limit, where = vocab_size, "vocab_size in config.json"
    else:
        limit, where = n_base + NUM_RESERVED_SPECIAL, f"{NUM_RESERVED_SPECIAL} special ids after the base ranks"
    decoder = cfg.get("added_tokens_decoder", {}) or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerError(f"{cfg_path}: added_tokens_decoder must be an object")
    named: dict[int, str] = {}
    for key, entry in decoder.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder key {key!r} is not a token id") from None
        name = _token_name(entry)
        if not name:
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder[{key}] has no string 'content'")
        if tid < n_base:
            raise TokenizerError(f"{cfg_path}: special token {name!r} has id {tid}, inside the "
                                 f"{n_base} base ranks of tiktoken.model")
        if tid >= limit:
            raise TokenizerError(f"{cfg_path}: special token {name!r} has id {tid:,}, beyond the vocabulary "
                                 f"(ids 0..{limit - 1:,}, {where})")
        named[tid] = name
    n_special = max([NUM_RESERVED_SPECIAL] + [t - n_base + 1 for t in named])
    specials: dict[str, int] = {}
    for tid in range(n_base, n_base + n_special):
        name = named.get(tid, f"<|reserved_token_{tid}|>")
        if name in specials:
            raise TokenizerError(f"{cfg_path}: special token {name!r} appears twice "
                                 f"(ids {specials[name]} and {tid})")
        specials[name] = tid
    return specials


def _model_vocab_size(model_dir: Path) -> int | None:
    """config.json's vocab_size, when present (best effort, as _model_eos_ids)."""
    try:
        v = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _model_eos_ids(model_dir: Path) -> set[int]:
    """eos ids from config.json / generation_config.json, when present (best effort: those files
    are validated by the config loader, not here)."""
    out: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        p = model_dir / name
        if not p.is_file():
            continue
        try:
            v = json.loads(p.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, int) and not isinstance(t, bool):
                out.add(t)
    return out


def _find_template(model_dir: Path, cfg: dict, cfg_path: Path) -> tuple[str, str]:
    """(template source, where it came from)."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: unreadable ({e})") from None
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # transformers' named-template form
        by_name = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = by_name.get("default", next(iter(by_name.values()), None))
    if isinstance(tpl, str) and tpl.strip():
        return tpl, f"{cfg_path} (chat_template)"
    if tpl is not None and not isinstance(tpl, str):
        raise TokenizerError(f"{cfg_path}: chat_template must be a string")
    json_path = model_dir / "chat_template.json"  # older processor-style file
    if json_path.is_file():
        tpl = _read_json(json_path).get("chat_template")
        if isinstance(tpl, str) and tpl.strip():
            return tpl, f"{json_path} (chat_template)"
    return DEFAULT_CHAT_TEMPLATE, "built-in Kimi K2 template"


# Limits of one chat-template rendering. A template is code shipped with the checkpoint: the
# sandbox keeps it away from Python, these keep it from running forever or filling memory.
MAX_TEMPLATE_ITERATIONS = 1_000_000  # items of range() over one rendering
MAX_TEMPLATE_SECONDS = 10.0
MAX_TEMPLATE_NUMBER = 1 << 24  # largest int argument of a filter or a str/list method (a width, a count)
TEMPLATE_OUTPUT_CHARS = 1 << 20  # output allowed beyond 4x the input's characters

_render_limits: ContextVar["_RenderLimits | None"] = ContextVar("kimi_template_limits", default=None)


class _RenderLimits:
    def __init__(self, max_chars: int):
        self.iterations = MAX_TEMPLATE_ITERATIONS
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        self.max_chars = max_chars

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering took more than {MAX_TEMPLATE_SECONDS:g} s")


class TemplateLimitError(Exception):
    """A chat template went past one of the rendering limits."""


def _limits() -> _RenderLimits:
    lim = _render_limits.get()
    return lim if lim is not None else _RenderLimits(TEMPLATE_OUTPUT_CHARS)  # outside apply_chat_template


def _check_number(x: Any) -> None:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_TEMPLATE_NUMBER:
        raise TemplateLimitError(f"number {x} is too large (limit {MAX_TEMPLATE_NUMBER:,})")


class _CountedRange:
    """range() whose iteration is charged to the rendering's iteration budget."""

    def __init__(self, r: range):
        self._r = r

    def __iter__(self):
        lim = _limits()
        for i, x in enumerate(self._r):
            lim.iterations -= 1
            if lim.iterations < 0:
                raise TemplateLimitError(f"loops ran more than {MAX_TEMPLATE_ITERATIONS:,} iterations")
            if not i & 1023:
                lim.check_time()
            yield x

    def __reversed__(self):
        return iter(_CountedRange(self._r[::-1]))

    def __len__(self):
        return len(self._r)

    def __getitem__(self, i):
        r = self._r[i]
        return _CountedRange(r) if isinstance(r, range) else r

    def __contains__(self, x):
        return x in self._r


def _jinja_env():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        # intercepted: also kept out of compile-time constant folding
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 1024 and left not in (0, 1, -1):
                raise TemplateLimitError(f"power {right} is too large")
            if operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
                n, seq = (right, left) if isinstance(left, (str, list, tuple)) else (left, right)
                if isinstance(n, int) and len(seq) * n > _limits().max_chars:
                    raise TemplateLimitError(f"repetition of {len(seq):,} x {n:,} is too large")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            if isinstance(getattr(__obj, "__self__", None), (str, list, tuple)):  # e.g. 'x'.ljust(10**10)
                for a in (*args, *kwargs.values()):
                    _check_number(a)
            return super().call(__context, __obj, *args, **kwargs)

    def bounded_filter(f):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
        def g(*args, **kwargs):
            for a in (*args[1:], *kwargs.values()):
                _check_number(a)
            return f(*args, **kwargs)
        return g

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes <, >, &, ' which a prompt must not get
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def bounded_range(*args):
        for a in args:
            _check_number(a)
        return _CountedRange(range(*args))

    # the same settings transformers renders chat templates with
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = bounded_range
    return env


def _text_size(value: Any) -> int:
    """Characters of the strings in a template argument (nested lists and dicts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_size(k) + _text_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) for v in value)
    return 0


def load_tokenizer(model_dir) -> "KimiTokenizer":
    """Load the Kimi tokenizer and chat template of a checkpoint directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: not a directory")
    ranks, vocab_digest = _read_ranks(model_dir / "tiktoken.model")
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise TokenizerError(f"{cfg_path}: missing (it names the special tokens)")
    cfg = _read_json(cfg_path)
    specials = _special_tokens(cfg, cfg_path, len(ranks), _model_vocab_size(model_dir))
    template, template_source = _find_template(model_dir, cfg, cfg_path)
    return KimiTokenizer(ranks, specials, cfg, template, template_source=template_source,
                         name_or_path=str(model_dir), extra_eos_ids=_model_eos_ids(model_dir),
                         vocab_digest=vocab_digest)


# ---------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------
class KimiTokenizer:
    """tiktoken BPE with Kimi's split pattern and special tokens, plus the chat template."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], config: dict,
                 chat_template: str = DEFAULT_CHAT_TEMPLATE, *, template_source: str = "chat template",
                 name_or_path: str = "", extra_eos_ids: Iterable[int] = (), vocab_digest: str | None = None):
        self._n_base = len(mergeable_ranks)
        self._specials = dict(special_tokens)
        self._id_to_special = {i: s for s, i in self._specials.items()}
        self._vocab_size = self._n_base + len(self._specials)
        try:
            self._enc = tiktoken.Encoding(name=f"kimi:{name_or_path}", pat_str=KIMI_PAT_STR,
                                          mergeable_ranks=mergeable_ranks, special_tokens=self._specials,
                                          explicit_n_vocab=self._vocab_size)
        except (AssertionError, ValueError) as e:
            raise TokenizerError(f"{name_or_path}: inconsistent vocabulary ({e})") from None
        self.name_or_path = name_or_path
        self._config = config

        # special-token lookup for allow_special; longest first so a name that extends another wins
        names = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names)))

        def tid(field, default):
            name = _token_name(config.get(field)) or default
            return self._specials.get(name) if name else None

        self._bos = tid("bos_token", "[BOS]")
        self._eos = tid("eos_token", "[EOS]")
        self._pad = tid("pad_token", "[PAD]")
        self._unk = tid("unk_token", "[UNK]")
        eos = {self._eos, self._specials.get("[EOS]"), self._specials.get("<|im_end|>")}
        eos.update(int(t) for t in extra_eos_ids if 0 <= int(t) < self._vocab_size)
        self._eos_ids = frozenset(t for t in eos if t is not None)

        # chat template: compiled now, so a broken template fails at load time with its file name
        import jinja2
        self._template_src = chat_template
        self._template_source = template_source
        try:
            self._template = _jinja_env().from_string(chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{template_source}: chat template syntax error at line {e.lineno}: "
                                 f"{e.message}") from None
        # content escaping for apply_chat_template (see _escape)
        self._esc_codes = {name: chr(_ESC_BASE + i) for i, name in enumerate(names)}
        self._esc_codes_rev = {c: n for n, c in self._esc_codes.items()}
        self._special_firsts = {n[0] for n in names}

        if vocab_digest is None:  # built in code rather than read from a file
            by_rank = sorted(mergeable_ranks, key=mergeable_ranks.__getitem__)
            vocab_digest = hashlib.sha256(b"\n".join(base64.b64encode(t) for t in by_rank)).hexdigest()
        h = hashlib.sha256(b"kimi-tokenizer-v1\0" + vocab_digest.encode())
        h.update(b"\0" + json.dumps(sorted((i, s) for s, i in self._specials.items()), ensure_ascii=False).encode())
        h.update(b"\0" + KIMI_PAT_STR.encode() + b"\0" + chat_template.encode("utf-8", "surrogatepass"))
        self._sha256 = h.hexdigest()

    def __repr__(self) -> str:
        return (f"KimiTokenizer({self.name_or_path!r}, vocab_size={self._vocab_size}, "
                f"template={self._template_source!r})")

    # ---- properties -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def num_base_tokens(self) -> int:
        return self._n_base

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends a generation: [EOS], <|im_end|>, and the configs' eos ids."""
        return set(self._eos_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def unk_token_id(self) -> int | None:
        return self._unk

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._specials.values())

    @property
    def chat_template(self) -> str:
        return self._template_src

    @property
    def sha256(self) -> str:
        """Stable hash of tiktoken.model, the special tokens, the split pattern and the template."""
        return self._sha256

    def is_special(self, token_id: int) -> bool:
        return token_id >= self._n_base

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its name)."""
        token_id = int(token_id)
        self._check_ids((token_id,))
        return self._enc.decode_single_token_bytes(token_id)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token name, or of a string that is exactly one base token."""
        if token in self._specials:
            return self._specials[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    # ---- encode / decode --------------------------------------------------
    def encode(self, text: str, allow_special: Union[bool, Collection[str]] = False) -> list[int]:
        """Token ids of `text`. Special-token text stays plain text unless `allow_special` is True
        (every special) or a collection of special-token names."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if not allow_special:
            return self._encode_plain(text)
        if allow_special is True:
            pattern = self._special_re
        else:
            allowed = set(allow_special)
            unknown = allowed - self._specials.keys()
            if unknown:
                raise ValueError(f"not special tokens: {sorted(unknown)}")
            pattern = re.compile("|".join(map(re.escape, sorted(allowed, key=len, reverse=True))))
        out: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            out += self._encode_plain(text[pos:m.start()])
            out.append(self._specials[m.group()])
            pos = m.end()
        out += self._encode_plain(text[pos:])
        return out

    def _encode_plain(self, text: str) -> list[int]:
        if len(text) <= MAX_RUN_CHARS:  # no chunking possible: skip the scans
            return self._enc.encode_ordinary(text)
        out: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i:i + MAX_ENCODE_CHARS]):
                out += self._enc.encode_ordinary(piece)
        return out

    def _check_ids(self, ids: list[int] | tuple[int, ...]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(t for t in ids if not 0 <= t < self._vocab_size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary [0, {self._vocab_size})")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy / mlx arrays
            ids = ids.tolist()
        ids = [int(t) for t in ids]
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [t for t in ids if t < self._n_base]
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- chat template ----------------------------------------------------
    def apply_chat_template(self, messages: Iterable[Mapping], add_generation_prompt: bool = True,
                            tokenize: bool = True, system_prompt: str | None = None,
                            **template_kwargs) -> Union[list[int], str]:
        """Render `messages` with the chat template; token ids by default (as transformers does),
        the rendered string with tokenize=False.

        `system_prompt`, when given, is put first as a system message (an error if the messages
        already start with one). Extra keyword arguments (e.g. tools) go to the template.

        Special-token text inside messages or template arguments is escaped before rendering, so
        only the specials the template writes itself become special ids.
        """
        import jinja2

        msgs = [dict(m) for m in messages]
        if system_prompt is not None:
            if msgs and msgs[0].get("role") == "system":
                raise ValueError("system_prompt given but the messages already start with a system message")
            msgs.insert(0, {"role": "system", "content": system_prompt})
        ctx = {k: self._escape(v) for k, v in template_kwargs.items()}
        ctx.update(
            messages=self._escape(msgs),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._name(self._bos), eos_token=self._name(self._eos),
            pad_token=self._name(self._pad), unk_token=self._name(self._unk),
        )
        limits = _RenderLimits(4 * _text_size(ctx) + TEMPLATE_OUTPUT_CHARS)
        token = _render_limits.set(limits)
        parts, size = [], 0
        try:
            for piece in self._template.generate(**ctx):
                parts.append(piece)
                size += len(piece)
                if size > limits.max_chars:
                    raise TemplateLimitError(f"output exceeded {limits.max_chars:,} characters")
                limits.check_time()
            rendered = "".join(parts)
        except TemplateLimitError as e:
            raise TokenizerError(f"{self._template_source}: chat template stopped: {e}") from None
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self._template_source}: chat template error: {e}") from None
        except (RecursionError, MemoryError, OverflowError, ArithmeticError, TypeError, ValueError, LookupError,
                AttributeError) as e:  # the template's own bugs: `1 + 'a'`, a recursive macro, ...
            raise TokenizerError(f"{self._template_source}: chat template error: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:300]}") from None
        finally:
            _render_limits.reset(token)
        if not tokenize:
            return self._unescape(rendered)
        # specials found in the escaped rendering are the template's own
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(rendered):
            out += self._encode_plain(self._unescape(rendered[pos:m.start()]))
            out.append(self._specials[m.group()])
            pos = m.end()
        out += self._encode_plain(self._unescape(rendered[pos:]))
        return out

    def _name(self, tid: int | None) -> str | None:
        return self._id_to_special.get(tid) if tid is not None else None

    # Escaping: each special-token name in user strings becomes ESC + one private-use code char;
    # a literal ESC becomes ESC + ESC_LITERAL. Both characters are in Unicode plane 15 (private
    # use), which templates' string filters (trim, upper, ...) leave alone.
    def _escape(self, value: Any) -> Any:
        if isinstance(value, str):
            if _ESC in value:
                value = value.replace(_ESC, _ESC + _ESC_LITERAL)
            if not any(c in value for c in self._special_firsts):  # cheap common case
                return value
            return self._special_re.sub(lambda m: _ESC + self._esc_codes[m.group()], value)
        if isinstance(value, Mapping):
            return {k: self._escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape(v) for v in value]
        return value

    def _unescape(self, text: str) -> str:
        if _ESC not in text:
            return text

        def sub(m):
            code = m.group(1)
            if code == _ESC_LITERAL:
                return _ESC
            return self._esc_codes_rev.get(code, m.group(0))

        return _ESC_RE.sub(sub, text)


_ESC = "\U000FFF00"
_ESC_LITERAL = "\U000FFF01"
_ESC_BASE = 0xF0000  # code chars for the special names: U+F0000.. (plane 15)
_ESC_RE = re.compile(re.escape(_ESC) + "(.)", re.DOTALL)


@lru_cache(maxsize=4)
def _long_run_re(limit: int) -> re.Pattern:
    # a run longer than `limit`, tried only at a run start (the lookbehinds), so the scan stays
    # linear in the text length; Python's \s is str.isspace(), as in the reference
    return re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (limit + 1, limit + 1))


def _split_long_runs(s: str, limit: int = MAX_RUN_CHARS):
    """Cut `s` inside runs of more than `limit` whitespace or non-whitespace characters, every
    `limit` characters from the run's start (the reference tokenizer's cut points)."""
    start = 0
    for m in _long_run_re(limit).finditer(s):
        a, b = m.span()
        for cut in range(a + limit, b, limit):
            yield s[start:cut]
            start = cut
    yield s[start:]


# ---------------------------------------------------------------------------
# streaming detokenizer
# ---------------------------------------------------------------------------
class StreamingDetokenizer:
    """Turns a stream of token ids into text without ever emitting half a character.

    Bytes of a multi-byte UTF-8 character split across tokens wait until the character is
    complete; bytes that can never become valid are replaced by U+FFFD as soon as that is
    certain, and an incomplete tail only in `finalize()`. The concatenation of all segments
    equals `tokenizer.decode(tokens)`.
    """

    def __init__(self, tokenizer: KimiTokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self._segment = ""
        self.tokens: list[int] = []

    def add_token(self, token_id: int) -> None:
        token_id = int(token_id)
        self.tokens.append(token_id)
        if self._skip and self._tok.is_special(token_id):
            return
        self._push(self._decoder.decode(self._tok.token_bytes(token_id)))

    def finalize(self) -> None:
        """Flush what is left; an incomplete character becomes U+FFFD."""
        self._push(self._decoder.decode(b"", final=True))

    def _push(self, s: str) -> None:
        if s:
            self._parts.append(s)
            self._segment += s

    @property
    def last_segment(self) -> str:
        """Text completed since the last read (reading clears it)."""
        s, self._segment = self._segment, ""
        return s

    @property
    def text(self) -> str:
        """All text completed so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
