"""Two host-side measurements behind choices in the engine (CPU, the default model's tokenizer).

1. Tokenizing 2 MB of text with `tokenizers`' encode against encode_batch, while another
   thread ticks every millisecond: how long that thread stalls (encode holds the GIL,
   encode_batch does not; engine/tokenizer.py uses encode_batch).
2. Pickling one step's 64 one-token RequestOutputs, as the engine process sends them
   (engine/outputs.py pickles them as constructor calls), against the default pickling of
   a slotted dataclass.

Usage: PYTHONPATH=. python bench/cpu_probes.py
"""

from __future__ import annotations

import pickle
import threading
import time
import timeit

from engine import loader
from engine.outputs import RequestOutput, SequenceOutput, TokenLogprob
from engine.tokenizer import TextTokenizer


def stall(fn) -> tuple[float, float]:
    """(seconds fn took, the longest gap between another thread's 1 ms ticks meanwhile)."""
    ticks, stop = [], [False]

    def tick():
        while not stop[0]:
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    began = time.perf_counter()
    fn()
    took = time.perf_counter() - began
    stop[0] = True
    ticker.join()
    return took, max(b - a for a, b in zip(ticks, ticks[1:]))


def pickling(outputs) -> tuple[float, float, int]:
    blob = pickle.dumps(outputs)
    dumps = min(timeit.repeat(lambda: pickle.dumps(outputs), number=200, repeat=5)) / 200
    loads = min(timeit.repeat(lambda: pickle.loads(blob), number=200, repeat=5)) / 200
    return dumps, loads, len(blob)


def main() -> None:
    tok = TextTokenizer.from_folder(loader.resolve_model_folder(None))
    text = ("The quick brown fox jumps over the lazy dog. " * 50000)[:2_000_000]
    for name, fn in (("encode", lambda: tok._tok.encode(text)), ("encode_batch", lambda: tok._tok.encode_batch([text]))):
        took, gap = stall(fn)
        print(f"tokenizers {name} of 2 MB: {took:.2f} s; longest stall of another thread: {gap * 1e3:.0f} ms")
    outputs = [RequestOutput(request_id=f"r{i}", sequences=(SequenceOutput(index=0, token_ids=(i,), text=""),),
                             finished=False, prompt_tokens=128, completion_tokens=i, cached_tokens=0) for i in range(64)]
    dumps, loads, size = pickling(outputs)
    print(f"64 one-token RequestOutputs as constructor calls: dumps {dumps * 1e6:.0f} us, loads {loads * 1e6:.0f} us, "
          f"{size} bytes")
    for cls in (RequestOutput, SequenceOutput, TokenLogprob):
        del cls.__reduce__  # back to the default pickling of a slotted dataclass
    dumps, loads, size = pickling(outputs)
    print(f"the same, default slotted pickling: dumps {dumps * 1e6:.0f} us, loads {loads * 1e6:.0f} us, {size} bytes")


if __name__ == "__main__":
    main()
