"""Microbenchmark: one request through the whole built-in hook chain, against an empty chain.

    python -m tests.benchmarks.hook_chain [--requests 20000] [--rounds 5] [--state redis://127.0.0.1:6379/0]

Both gateways run the same core calls (authenticate, the three request checks, rewrite_response,
record_usage) on the same request; the full one has every built-in plugin enabled with a
named key that has model globs, moderation rules, rate limits and budgets, and the in-memory
state backend (or, with --state, Redis at that URL: then each request makes three round
trips, rate limit, reserve and settle, and the per-request latencies' p50 is reported too).
Rounds alternate (full, empty, full, empty, …); the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiohttp.test_utils import make_mocked_request

from imgproxy.gateway import Gateway
from imgproxy.messages import GeneratedImage, ImagesResult, RequestContext
from imgproxy.pipeline import authenticate, check_request, record_usage

from imgproxy.validation import check_capabilities, check_schema

KEY = "sk-benchmark-key-0000000000"
PROVIDERS = """
providers:
  openai: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-upstream}
models:
  dall-e-3: {provider: openai}
"""
FULL = PROVIDERS + f"""
auth:
  api_keys: sk-other-key-000000000000
  keys:
    - name: team-a
      key: {KEY}
      models: ["dall-e-*", gpt-image-1]
      moderation_levels: [auto, low]
      rate_limit: {{requests_per_minute: 100000000, images_per_minute: 100000000, per_user: true}}
      budget: {{daily_usd: 100000000, monthly_usd: 100000000, usd_per_minute: 100000000}}
moderation:
  categories:
    violence: {{words: [behead, "blood bath", gore], patterns: ['\\bkill(ing|ed)?\\b']}}
    weapons: {{words: [bazooka, grenade, rifle]}}
"""
EMPTY = PROVIDERS + "plugins: {disable: [auth, moderation, ratelimit, cost, rewrite]}\n"
BODY = {"model": "dall-e-3", "prompt": "A lighthouse on a cliff at dusk, oil painting", "user": "user-42", "response_format": "b64_json"}


async def one_request(gateway: Gateway, http, body: dict) -> None:
    ctx = RequestContext(gateway=gateway, http=http, request_id="bench")
    ctx.identity = await authenticate(ctx)
    ctx.body = body
    check_schema(body)
    ctx.route = ctx.target = gateway.routing.resolve(body["model"])
    ctx.request = check_capabilities(body, ctx.route)
    await check_request(ctx)
    result = ImagesResult(created=1, images=[GeneratedImage(b64_json="aGVsbG8=")])
    await gateway.hooks.each("imgproxy_rewrite_response", ctx=ctx, result=result)
    ctx.outcome.status, ctx.outcome.images = 200, len(result.images)
    await record_usage(ctx)


async def per_request_seconds(gateway: Gateway, http, requests: int, latencies: list | None = None) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        if latencies is not None:
            one = time.perf_counter()
            await one_request(gateway, http, dict(BODY))
            latencies.append(time.perf_counter() - one)
        else:
            await one_request(gateway, http, dict(BODY))
    return (time.perf_counter() - started) / requests


async def main(requests: int, rounds: int, state_url: str | None = None) -> dict:
    state = f"state: {{backend: redis, url: '{state_url}', key_prefix: 'bench-{time.time_ns()}:'}}\n" if state_url else ""
    full = await Gateway.load(text=FULL + state, env={})
    empty = await Gateway.load(text=EMPTY, env={})
    http = make_mocked_request("POST", "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}", "Host": "bench"})
    await per_request_seconds(full, http, 500)  # warm-up
    await per_request_seconds(empty, http, 500)
    times = {"full": [], "empty": []}
    latencies: list[float] = []
    for _ in range(rounds):
        times["full"].append(await per_request_seconds(full, http, requests, latencies if state_url else None))
        times["empty"].append(await per_request_seconds(empty, http, requests))
    full_us, empty_us = (statistics.median(times[k]) * 1e6 for k in ("full", "empty"))
    await full.state.close()
    result = {"full_us": full_us, "empty_us": empty_us, "chain_us": full_us - empty_us, "rounds": times}
    if latencies:
        result["full_p50_us"] = statistics.median(latencies) * 1e6
        result["full_p99_us"] = statistics.quantiles(latencies, n=100)[98] * 1e6
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--state", help="a Redis URL: the full chain uses the Redis state backend")
    args = parser.parse_args()
    result = asyncio.run(main(args.requests, args.rounds, args.state))
    print(f"per request, median of {args.rounds} interleaved rounds of {args.requests}:")
    print(f"  empty hook chain (core path only): {result['empty_us']:7.1f} us")
    print(f"  full built-in chain:               {result['full_us']:7.1f} us")
    print(f"  the chain's own cost:              {result['chain_us']:7.1f} us  (ratio {result['full_us'] / result['empty_us']:.2f}x)")
    if "full_p50_us" in result:
        print(f"  full chain on Redis, per request:   p50 {result['full_p50_us']:7.1f} us, p99 {result['full_p99_us']:7.1f} us")
