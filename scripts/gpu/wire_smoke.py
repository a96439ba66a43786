"""GPU smoke of the Djinn server through the wire, default server flags (run with the device tool):
the three decode modes agree, a Reason -> park -> Reflect wave of N agents, a request with nothing new,
a client that leaves mid-request, and SIGTERM with a request in flight. Prints one JSON report.

    python3 scripts/gpu/wire_smoke.py --model-id meta-llama/Llama-2-7b-hf --agents 64 --out $OUT/wire.json
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from djinn.client import DjinnClient
from djinn.runners.decode import REMOTE_MODES
from djinn.runners.local_server import LocalServer
from djinn.server import protocol
from djinn.server.config import ServerConfig

PROMPT = list(range(1000, 1072))  # 72 tokens, as the experiment's prompt


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def wave(address: str, n: int, new_tokens: int) -> dict:
    """Each agent: Reason (prompt + new_tokens), park (its Act), Reflect (3 tokens + new_tokens); every
    agent connects and opens its session first, then all start Reason together (as bench-engine's do)."""
    barrier = threading.Barrier(n)

    def agent(i: int) -> tuple[float, float]:
        with DjinnClient(address) as c:
            s = c.open_session()
            barrier.wait()
            t0 = time.perf_counter()
            s.generate([t + i for t in PROMPT], new_tokens)
            reason = time.perf_counter() - t0
            s.park()
            t0 = time.perf_counter()
            s.generate([5, 6, 7], new_tokens)
            reflect = time.perf_counter() - t0
            s.close()
            return reason, reflect

    with ThreadPoolExecutor(n) as pool:
        times = list(pool.map(agent, range(n)))
    reason, reflect = [t[0] * 1e3 for t in times], [t[1] * 1e3 for t in times]
    return {"agents": n, "reason_p50_ms": statistics.median(reason), "reason_p99_ms": pct(reason, 99),
            "reflect_p50_ms": statistics.median(reflect), "reflect_p99_ms": pct(reflect, 99)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-id", default="meta-llama/Llama-2-7b-hf")
    p.add_argument("--agents", type=int, nargs="+", default=[8, 64])
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--out", required=True)
    p.add_argument("--log", default="/tmp/wire-server.log")
    args = p.parse_args()
    report: dict = {"model_id": args.model_id,
                    "server_flags": "defaults (+ --host 127.0.0.1, free ports, --max-concurrent 2 x the largest wave)"}
    # default flags, but admission for every agent of the largest wave, as the experiment sizes it
    config = ServerConfig(model_id=args.model_id, weights="synthetic", device="cuda",
                          max_concurrent=max(ServerConfig().max_concurrent, 2 * max(args.agents)))
    server = LocalServer(config, log_path=args.log)
    t0 = time.perf_counter()
    server.start(timeout=600)
    report["start_s"] = time.perf_counter() - t0
    with DjinnClient(server.address) as c:
        report["hello"] = c.hello()
        tokens = {mode: fn(c, args.model_id, PROMPT, args.new_tokens) for mode, fn in REMOTE_MODES.items()}
        report["modes_agree"] = len({tuple(t) for t in tokens.values()}) == 1
        ref = tokens["full_djinn"]
        report["first_difference_from_full_djinn"] = {  # fp16 near-ties on random weights can flip an argmax
            m: next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), None) for m, t in tokens.items()}
        s = c.open_session()
        s.generate(PROMPT, 0)
        report["nothing_new_continues"] = s.generate([], 5) == tokens["full_djinn"][:5]
    report["waves"] = [wave(server.address, n, args.new_tokens) for n in args.agents]

    gone = DjinnClient(server.address).connect()  # leaves mid-request: its slot must come back
    s = gone.open_session()
    gone._sock.sendall(protocol.encode({"op": "generate", "id": 1, "session_id": s.id, "session_key": s.key,
                                        "max_new_tokens": 400, "tokens": PROMPT}))
    time.sleep(0.05)
    gone.close()
    time.sleep(0.5)
    report["active_after_client_left"] = [ln for ln in server.metrics().splitlines()
                                          if ln.startswith("djinn_active_requests")]

    busy = DjinnClient(server.address).connect()  # SIGTERM with a request in flight
    s = busy.open_session()
    busy._sock.sendall(protocol.encode({"op": "generate", "id": 2, "session_id": s.id, "session_key": s.key,
                                        "max_new_tokens": 200, "tokens": PROMPT}))
    time.sleep(0.05)
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    report["sigterm_exit_code"] = server.proc.wait(timeout=60)
    report["sigterm_exit_s"] = time.perf_counter() - t0
    (length,) = struct.unpack(">I", busy._recv_exact(9)[5:9])
    header, out = protocol.decode_payload(busy._recv_exact(length))
    report["in_flight_reply"] = {"ok": header["ok"], "tokens": len(out["tokens"]) if "tokens" in out else None,
                                 "code": header.get("code")}
    busy.close()
    text = json.dumps(report, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
