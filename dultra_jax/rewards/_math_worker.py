"""math-verify worker process for `dultra_jax.rewards.math` (not imported by the package).

Started as `python -P <this file>`; speaks JSON lines: it writes `{"ready": true}` once
`math_verify` is imported, then answers each request
`{"gold": str, "pred": str, "t": int, "style": "boxed" | "official"}` with `{"ok": bool}` (or
`"unparsed"` for an official request it could not parse). It runs math-verify in its own main
thread, so math-verify's `signal.alarm` timeouts (`t` seconds per parse / comparison) work here;
the parent adds a wall-clock bound on top and kills this process when it is exceeded. Exits at end of input.
"""

import json
import logging
import os
import sys


def main():
    proto = os.dup(1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol
    logging.disable(logging.CRITICAL)
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except Exception as exc:  # noqa: BLE001
        os.write(proto, (json.dumps({"ready": False, "error": repr(exc)}) + "\n").encode())
        return
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def compare(gold, pred, t):
        gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=t)
        pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=t)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))

    def compare_official(gold, pred, t):
        # The official MATH-500 scorer: `$...$`, default extraction; "unparsed" lets the caller
        # fall back to its string comparison, as the official scorer does.
        gold_parsed = parse("$" + gold + "$", parsing_timeout=t)
        pred_parsed = parse("$" + pred + "$", parsing_timeout=t)
        if not gold_parsed or not pred_parsed:
            return "unparsed"
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))

    os.write(proto, b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        req = {}
        try:
            req = json.loads(line)
            official = req.get("style") == "official"
            ok = (compare_official if official else compare)(str(req["gold"]), str(req["pred"]), int(req["t"]))
        except Exception:  # noqa: BLE001 - any failure is "not verified" ("unparsed" when official)
            ok = "unparsed" if req.get("style") == "official" else False
        os.write(proto, (json.dumps({"ok": ok}) + "\n").encode())


if __name__ == "__main__":
    main()
