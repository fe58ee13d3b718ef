"""The largest values money and token counts may take where they enter the proxy.

Every number that can reach a ledger row, a counter or a sum comes from one of four doors:
provider usage, heartbeat reports, policy limits and the price table. Each door checks its
values against these bounds, so that a row's cost always fits a 64-bit integer with room
to spare, and no client, upstream or typo can make a column overflow downstream. The
bounds are far above anything real (the largest context windows are a few million tokens;
the dearest price in the bundled table is $600 per 1M tokens).
"""

from __future__ import annotations

from decimal import Decimal

# Tokens in one usage field of one call (or one heartbeat report).
MAX_TOKENS = 100_000_000
# LLM calls one heartbeat may report.
MAX_REPORTED_CALLS = 1_000_000
# A price-table rate, USD per 1M tokens.
MAX_PRICE_PER_M = Decimal(10_000)
# A price per unit (image, minute of audio, 1M characters of speech), USD.
MAX_UNIT_PRICE = Decimal(1_000)
# A money limit of a policy, USD.
MAX_LIMIT_USD = Decimal(1_000_000_000)
# A count limit (requests, intents, identical requests).
MAX_COUNT = 1_000_000_000
# What one heartbeat may report, at most (heartbeat.max_cost_usd cannot exceed it).
MAX_HEARTBEAT_USD = Decimal(1_000_000)
# A ledger column holding an integer is a signed 64-bit integer on every engine.
INT64_MAX = 2**63 - 1

# With the bounds above, one call costs at most 2 x MAX_TOKENS x MAX_PRICE_PER_M per token
# (input side and output side) = 2e18 pico-USD: inside int64 (9.2e18) with room to spare.
assert 2 * MAX_TOKENS * int(MAX_PRICE_PER_M) * 10**6 < INT64_MAX
