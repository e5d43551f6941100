"""C-Eval prompts to token ids, as lm-evaluation-harness makes them, without re-encoding shared text.

Every prompt of a subject is ``head + question block``, where the head (description + k shots) is ~1,000
tokens shared by every question, and each choice is scored from lm-eval's joint encoding of context +
continuation. Encoding all of that whole, per question, is what both scoring modes pay before the model
runs: on a tiny model it was a sixth of prefix-cached scoring's time. The shortcuts here rest on a tokenizer's
promise (``Tokenizer.splits_after_newlines``: the text is split by a regex before BPE, and no piece joins a
newline to the non-space after it), and each one checks its result against a whole encoding before it is
trusted; a tokenizer without the promise (sentencepiece) is encoded whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def lmeval_split(encode: Callable[[str], list[int]], context: str, continuations: Sequence[str],
                 splits_after_newlines: bool = False) -> tuple[list[int], list[list[int]]]:
    """(context ids, continuation ids per choice) exactly as lm-eval's ``_encode_pair`` makes them.

    ``splits_after_newlines``: the tokenizer's promise (``Tokenizer.splits_after_newlines``) that lets each
    choice re-encode only the context's last line.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    ctx_ids = encode(context)
    joint = _last_line_encoder(encode, context, ctx_ids) if splits_after_newlines else None
    if joint is None:
        def joint(continuation: str) -> list[int]:
            return encode(context + continuation)
    conts = []
    for continuation in continuations:
        cont = joint(continuation)[len(ctx_ids):]
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after the context "
                             f"(the tokenizer merged it into {context[-20:]!r})")
        conts.append(cont)
    return ctx_ids, conts


def _last_line_encoder(encode: Callable[[str], list[int]], context: str,
                       ctx_ids: list[int]) -> Callable[[str], list[int]] | None:
    """``encode(context + continuation)``, re-encoding only the context's last line with each continuation.

    The line (from the context's ``newline_cut``: "答案：") is short; for a tokenizer that splits text after
    newlines the context's tokens up to it are reused, when the line also starts on a token boundary of the
    context's own encoding (checked here, per context; a bos or a dummy prefix fails it). Tests compare the
    result with whole encodings. None: encode whole.
    """
    cut = newline_cut(context)
    if cut == 0:
        return None
    line = context[cut:]
    line_ids = encode(line)
    keep = len(ctx_ids) - len(line_ids)
    if keep <= 0 or ctx_ids[keep:] != line_ids:
        return None
    head = ctx_ids[:keep]
    return lambda continuation: head + encode(line + continuation)


def newline_cut(text: str) -> int:
    """The end of ``text``'s last line break that sits between two non-space characters; 0 if none.

    Under the promise no piece spans such a break, and the break's own piece is the same whether the text
    ends there or goes on: encode(text[:cut] + rest) == encode(text[:cut]) + encode(rest) for any rest
    that starts with text[cut]. (A break next to other whitespace is not safe: GPT-2's pattern makes
    "\\n\\n" one piece at the end of a text but two before a letter.)
    """
    i = text.rfind("\n")
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return 0


class PromptEncoder:
    """``encode(text)`` for one subject's prompts: memoized, and reusing the ids of the subject's heads.

    A text that starts with a head given to ``add_head`` is encoded as the ids of the head up to its
    ``newline_cut`` (encoded once) plus the encoding of the rest: for a 5-shot C-Eval prompt, the question
    block and the shots' last line instead of ~1,000 tokens. Which pieces meet at the cut depends only on the
    characters around it, the same for every text of a head, so the first text of each head is also encoded
    whole and compared; a head whose reuse differs is never reused (and a tokenizer that adds a bos or a
    dummy prefix to a text's start fails that check).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.reuses_heads = bool(getattr(tokenizer, "splits_after_newlines", False))
        self.encoded_chars = 0  # characters handed to the tokenizer: what the reuse saves
        self._memo: dict[str, list[int]] = {}
        self._cuts: dict[str, int] = {}  # head -> its newline_cut; 0: texts of this head are encoded whole
        self._head_ids: dict[str, list[int]] = {}  # head -> ids of head[:cut], once its first text checked them

    def add_head(self, head: str) -> None:
        if head not in self._cuts:
            self._cuts[head] = newline_cut(head) if self.reuses_heads else 0

    def encode(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = self._memo[text] = self._encode(text)
        return ids

    def clear(self) -> None:
        """Forget the memoized texts (heads are kept)."""
        self._memo.clear()

    def _tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        self.encoded_chars += len(text)
        return self.tok.encode(text, add_bos=add_bos)

    def _encode(self, text: str) -> list[int]:
        head = self._head_of(text)
        if head is None:
            return self._tokenize(text)
        cut = self._cuts[head]
        head_ids = self._head_ids.get(head)
        if head_ids is None:  # the head's first text: the reuse is checked against its whole encoding
            head_ids = self._tokenize(head[:cut])
            whole = self._tokenize(text)
            if head_ids + self._tokenize(text[cut:], add_bos=False) == whole:
                self._head_ids[head] = head_ids
            else:
                self._cuts[head] = 0
            return whole
        return head_ids + self._tokenize(text[cut:], add_bos=False)

    def _head_of(self, text: str) -> str | None:
        """The longest reusable head ``text`` starts with."""
        best = None
        for head, cut in self._cuts.items():
            if cut and text.startswith(head) and (best is None or len(head) > len(best)):
                best = head
        return best
