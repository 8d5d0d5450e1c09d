"""Generated documents for the `math` and `data` domains of the default corpus.

`math_problems` writes arithmetic, number-theory, algebra and calculus
questions with worked answers, in the spirit of DeepMind's Mathematics dataset
(Saxton et al., 2019, "Analysing Mathematical Reasoning Abilities of Neural
Models"): one problem per document, a `Question:` line and an `Answer:` that
shows the steps. `data_records` writes small tables of synthetic records as
JSON, JSON Lines or CSV, with internal consistency (an order's total is the
sum of its lines) so there is structure to learn beyond the syntax.

Both are infinite iterators of `(text, source)` pairs driven by one
`random.Random` seeded from a string: string seeds are hashed with SHA-512, not
`hash()`, so the stream is the same on every machine and every run, whatever
PYTHONHASHSEED is. Only integer draws and `random()` are used, whose algorithms
have been stable across Python 3 releases.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from fractions import Fraction

_VARS = "xyzabcdkmnpqrtw"


def _signed(n: int) -> str:
    """`+ 3` / `- 3`, for writing `a*x + b` without `+ -3`."""
    return f"+ {n}" if n >= 0 else f"- {-n}"


def _poly_str(coeffs: list[int], var: str) -> str:
    """Render sum(coeffs[i] * var**i), highest power first, e.g. `3*x**2 - x + 4`."""
    terms: list[str] = []
    for power in range(len(coeffs) - 1, -1, -1):
        c = coeffs[power]
        if c == 0:
            continue
        mag = abs(c)
        if power == 0:
            body = str(mag)
        else:
            head = "" if mag == 1 else f"{mag}*"
            body = head + (var if power == 1 else f"{var}**{power}")
        if not terms:
            terms.append(body if c > 0 else f"-{body}")
        else:
            terms.append(f"+ {body}" if c > 0 else f"- {body}")
    return " ".join(terms) if terms else "0"


def _p(n: int) -> str:
    """A number as an operand: negative numbers in parentheses, `3 * (-2)`."""
    return str(n) if n >= 0 else f"({n})"


def _add_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(-9999, 9999), rng.randint(-9999, 9999)
    if rng.random() < 0.5:
        return f"What is {a} + {_p(b)}?", f"{a} + {_p(b)} = {a + b}\nThe answer is {a + b}."
    steps = f"{a} - {_p(b)} = {a} + {_p(-b)} = {a - b}" if b < 0 else f"{a} - {b} = {a - b}"
    return f"Calculate {a} - {_p(b)}.", f"{steps}\nThe answer is {a - b}."


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(12, 999), rng.randint(2, 99)
    tens, units = divmod(b, 10)
    if tens and units:  # distribute over the tens and units digits, as done by hand
        steps = f"{a} * {b} = {a} * {tens * 10} + {a} * {units}\n= {a * tens * 10} + {a * units}\n= {a * b}"
    else:
        steps = f"{a} * {b} = {a * b}"
    return f"What is {a} times {b}?", f"{steps}\nThe answer is {a * b}."


def _divide(rng: random.Random) -> tuple[str, str]:
    b = rng.randint(2, 99)
    q, r = rng.randint(2, 999), rng.randint(0, b - 1)
    a = b * q + r
    text = f"{a} = {b} * {q} + {r}"
    if r == 0:
        return f"Divide {a} by {b}.", f"{text}\nSo {a} / {b} = {q}."
    return (
        f"What is the quotient and remainder when {a} is divided by {b}?",
        f"{text}\nThe quotient is {q} and the remainder is {r}.",
    )


def _fractions(rng: random.Random) -> tuple[str, str]:
    f1 = Fraction(rng.randint(1, 12), rng.randint(2, 12))
    f2 = Fraction(rng.randint(1, 12), rng.randint(2, 12))
    op = rng.choice("+-*")
    result = {"+": f1 + f2, "-": f1 - f2, "*": f1 * f2}[op]
    if op == "*":
        work = f"({f1.numerator}*{f2.numerator})/({f1.denominator}*{f2.denominator})"
    else:
        common = f1.denominator * f2.denominator // math.gcd(f1.denominator, f2.denominator)
        n1 = f1.numerator * (common // f1.denominator)
        n2 = f2.numerator * (common // f2.denominator)
        work = f"{n1}/{common} {op} {n2}/{common} = ({n1} {op} {n2})/{common}"
    return f"Evaluate {f1} {op} {f2}.", f"{work} = {result}\nThe answer is {result}."


def _linear_equation(rng: random.Random) -> tuple[str, str]:
    var = rng.choice(_VARS)
    x = rng.randint(-20, 20)
    a, c = rng.randint(2, 12), rng.randint(-12, 12)
    if c == a:
        c += 1
    b = rng.randint(-50, 50)
    d = (a - c) * x + b  # so that a*x + b = c*x + d holds at x
    lhs = f"{a}*{var} {_signed(b)}"
    rhs = f"{c}*{var} {_signed(d)}" if c else str(d)
    lines = [f"{lhs} = {rhs}"]
    if c:
        lines.append(f"{a}*{var} - ({c}*{var}) = {d} - ({b})")
    else:
        lines.append(f"{a}*{var} = {d} - ({b})")
    lines.append(f"{a - c}*{var} = {d - b}")
    lines.append(f"{var} = {d - b} / {a - c} = {x}")
    return f"Solve {lhs} = {rhs} for {var}.", "\n".join(lines) + f"\nSo {var} = {x}."


def _gcd_lcm(rng: random.Random) -> tuple[str, str]:
    g = rng.randint(2, 30)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    if rng.random() < 0.5:
        steps, x, y = [], max(a, b), min(a, b)
        while y:
            steps.append(f"{x} = {x // y} * {y} + {x % y}")
            x, y = y, x % y
        return (
            f"What is the greatest common divisor of {a} and {b}?",
            "\n".join(steps) + f"\nThe greatest common divisor is {x}.",
        )
    lcm = a * b // math.gcd(a, b)
    return (
        f"Find the least common multiple of {a} and {b}.",
        f"gcd({a}, {b}) = {math.gcd(a, b)}\n"
        f"lcm = {a} * {b} / {math.gcd(a, b)} = {lcm}\nThe answer is {lcm}.",
    )


def _prime_factors(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(12, 20000)
    factors, m, p, steps = [], n, 2, []
    while p * p <= m:
        while m % p == 0:
            factors.append(p)
            steps.append(f"{m} = {p} * {m // p}")
            m //= p
        p += 1
    if m > 1:
        factors.append(m)
    if len(factors) == 1:
        return (
            f"Is {n} a prime number?",
            f"{n} has no divisor between 2 and {math.isqrt(n)}.\nYes, {n} is prime.",
        )
    return (
        f"List the prime factors of {n}.",
        "\n".join(steps) + f"\n{n} = {' * '.join(map(str, factors))}\n"
        f"The prime factors are {', '.join(map(str, sorted(set(factors))))}.",
    )


def _evaluate_polynomial(rng: random.Random) -> tuple[str, str]:
    var = rng.choice(_VARS)
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 4))]
    coeffs[-1] = coeffs[-1] or 1
    x = rng.randint(-6, 6)
    name = rng.choice("fghuv")
    powers = ["", f"*({x})"] + [f"*({x})**{i}" for i in range(2, len(coeffs))]
    terms = [f"{_p(c)}{powers[i]}" for i, c in enumerate(coeffs) if c][::-1]
    values = [c * x**i for i, c in enumerate(coeffs) if c][::-1]
    value = sum(values)
    return (
        f"Let {name}({var}) = {_poly_str(coeffs, var)}. What is {name}({x})?",
        f"{name}({x}) = {' + '.join(terms)}\n= {' + '.join(_p(v) for v in values)}\n"
        f"= {value}\nThe answer is {value}.",
    )


def _expand(rng: random.Random) -> tuple[str, str]:
    var = rng.choice(_VARS)
    a, b, c, d = (rng.randint(-9, 9) or 1 for _ in range(4))
    product = [b * d, a * d + b * c, a * c]  # (a*v + b)(c*v + d)
    first, second = _poly_str([b, a], var), _poly_str([d, c], var)
    return (
        f"Expand ({first})*({second}).",
        f"= {_p(a)}*{_p(c)}*{var}**2 + ({_p(a)}*{_p(d)} + {_p(b)}*{_p(c)})*{var} + {_p(b)}*{_p(d)}\n"
        f"= {_poly_str(product, var)}",
    )


def _differentiate(rng: random.Random) -> tuple[str, str]:
    var = rng.choice(_VARS)
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(3, 6))]
    coeffs[-1] = coeffs[-1] or 2
    deriv = [i * c for i, c in enumerate(coeffs)][1:]
    steps = [
        f"d/d{var} ({c}*{var}**{i}) = {i * c}*{var}**{i - 1}"
        for i, c in enumerate(coeffs)
        if c and i >= 2
    ]
    return (
        f"Differentiate {_poly_str(coeffs, var)} with respect to {var}.",
        "\n".join(steps) + ("\n" if steps else "") + f"The derivative is {_poly_str(deriv, var)}.",
    )


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    nums = [round(rng.uniform(-100, 100), rng.choice([0, 1, 2])) for _ in range(rng.randint(3, 7))]
    nums = [int(v) if float(v).is_integer() else v for v in nums]
    order = rng.choice(["increasing", "decreasing"])
    result = sorted(nums, reverse=order == "decreasing")
    return (
        f"Sort {', '.join(map(str, nums))} in {order} order.",
        f"{', '.join(map(str, result))}",
    )


def _rounding(rng: random.Random) -> tuple[str, str]:
    value = rng.randint(10_000, 99_999_999)
    place, unit = rng.choice(
        [(10, "ten"), (100, "hundred"), (1000, "thousand"), (10**6, "million")]
    )
    # Round half up (school rounding), written out so the rule is explicit.
    down = value - value % place
    result = down + place if value % place * 2 >= place else down
    return (
        f"Round {value} to the nearest {unit}.",
        f"{value} lies between {down} and {down + place}.\nIt is closer to {result}.\n"
        f"The answer is {result}.",
    )


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    unit, small, factor = rng.choice(
        [
            ("kilometres", "metres", 1000),
            ("metres", "centimetres", 100),
            ("kilograms", "grams", 1000),
            ("hours", "minutes", 60),
            ("minutes", "seconds", 60),
            ("litres", "millilitres", 1000),
            ("days", "hours", 24),
        ]
    )
    amount = Fraction(rng.randint(1, 400), rng.choice([1, 2, 4, 5, 10]))
    shown = f"{float(amount):g}"
    result = amount * factor
    result_s = f"{float(result):g}"
    if rng.random() < 0.5:
        return (
            f"How many {small} are there in {shown} {unit}?",
            f"1 {unit[:-1]} = {factor} {small}\n{shown} * {factor} = {result_s}\nThe answer is {result_s}.",
        )
    return (
        f"Convert {result_s} {small} to {unit}.",
        f"1 {unit[:-1]} = {factor} {small}\n{result_s} / {factor} = {shown}\nThe answer is {shown}.",
    )


def _sequence(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(-50, 50), rng.randint(-15, 15) or 3
    terms = [start + i * step for i in range(rng.randint(4, 6))]
    nxt = terms[-1] + step
    return (
        f"What comes next: {', '.join(map(str, terms))}?",
        f"The difference between consecutive terms is {step}.\n{terms[-1]} {_signed(step)} = {nxt}\n"
        f"The next term is {nxt}.",
    )


_MATH_GENERATORS: list[tuple[str, Callable[[random.Random], tuple[str, str]]]] = [
    ("arithmetic__add_or_sub", _add_sub),
    ("arithmetic__mul", _multiply),
    ("arithmetic__div", _divide),
    ("arithmetic__fractions", _fractions),
    ("algebra__linear_1d", _linear_equation),
    ("numbers__gcd_lcm", _gcd_lcm),
    ("numbers__prime_factors", _prime_factors),
    ("numbers__round", _rounding),
    ("polynomials__evaluate", _evaluate_polynomial),
    ("polynomials__expand", _expand),
    ("calculus__differentiate", _differentiate),
    ("comparison__sort", _sort_numbers),
    ("measurement__conversion", _unit_conversion),
    ("algebra__sequence_next_term", _sequence),
]


def math_problems(seed: int) -> Iterator[tuple[str, str]]:
    """Endless `(text, source)` pairs, one worked problem each; same `seed`, same stream."""
    rng = random.Random(f"moelab-math-{seed}")
    for index in itertools.count():
        name, gen = _MATH_GENERATORS[rng.randrange(len(_MATH_GENERATORS))]
        question, answer = gen(rng)
        yield f"Question: {question}\nAnswer:\n{answer}\n", f"math:{name}:{index}"


# Small closed vocabularies keep the records plausible without any download.
_FIRST = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Barbara",
    "Edsger",
    "Donald",
    "Margaret",
    "Ken",
    "Dennis",
    "Frances",
    "John",
    "Radia",
    "Tim",
    "Sophie",
    "Guido",
    "Yukihiro",
    "Bjarne",
    "Hedy",
    "Katherine",
    "Leslie",
    "Niklaus",
    "Shafi",
    "Tu",
    "Wei",
    "Amara",
    "Kofi",
    "Ines",
]
_LAST = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Liskov",
    "Dijkstra",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Ritchie",
    "Allen",
    "McCarthy",
    "Perlman",
    "Lee",
    "Wilson",
    "Rossum",
    "Matsumoto",
    "Stroustrup",
    "Lamarr",
    "Johnson",
    "Lamport",
    "Wirth",
    "Goldwasser",
    "Nguyen",
]
_CITIES = [
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Toronto",
    "Lima",
    "Oslo",
    "Pune",
    "Cairo",
    "Austin",
    "Leeds",
    "Porto",
    "Hanoi",
    "Quito",
    "Riga",
    "Perth",
    "Accra",
    "Bergen",
    "Seville",
]
_PRODUCTS = [
    "kettle",
    "lamp",
    "notebook",
    "backpack",
    "headphones",
    "mug",
    "keyboard",
    "monitor",
    "bicycle pump",
    "tent",
    "umbrella",
    "chair",
    "desk",
    "blender",
    "router",
    "camera",
]
_ADJ = ["compact", "deluxe", "eco", "classic", "pro", "mini", "smart", "travel", "heavy-duty"]
_TAGS = ["sale", "new", "bestseller", "outdoor", "office", "kitchen", "gift", "refurbished"]
_SERVICES = ["auth", "billing", "search", "gateway", "scheduler", "storage", "mailer"]
_LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR"]
_MESSAGES = [
    "request completed",
    "cache miss",
    "retrying upstream call",
    "token refreshed",
    "slow query",
    "connection reset by peer",
    "job queued",
    "disk usage above threshold",
]


def _date(rng: random.Random) -> str:
    return f"20{rng.randint(15, 25):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _timestamp(rng: random.Random) -> str:
    return (
        f"{_date(rng)}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
    )


def _person(rng: random.Random, i: int) -> dict:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return {
        "id": i,
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.org",
        "age": rng.randint(18, 90),
        "city": rng.choice(_CITIES),
        "signup_date": _date(rng),
        "active": rng.random() < 0.8,
    }


def _product(rng: random.Random, i: int) -> dict:
    return {
        "sku": f"{rng.choice('ABCDEFGH')}{rng.randint(1000, 9999)}",
        "name": f"{rng.choice(_ADJ)} {rng.choice(_PRODUCTS)}",
        "price": round(rng.randint(199, 99999) / 100, 2),
        "stock": rng.randint(0, 500),
        "tags": sorted({rng.choice(_TAGS) for _ in range(rng.randint(0, 3))}),
    }


def _order(rng: random.Random, i: int) -> dict:
    lines = []
    for _ in range(rng.randint(1, 4)):
        qty, unit = rng.randint(1, 5), rng.randint(199, 20000)
        lines.append(
            {
                "item": rng.choice(_PRODUCTS),
                "qty": qty,
                "unit_price": unit / 100,
                "subtotal": qty * unit / 100,
            }
        )
    # The total is computed in integer cents so it is exact, as a real ledger would be.
    total_cents = sum(round(line["subtotal"] * 100) for line in lines)
    return {
        "order_id": f"ORD-{rng.randint(100000, 999999)}",
        "customer_id": rng.randint(1, 5000),
        "date": _date(rng),
        "lines": lines,
        "total": total_cents / 100,
        "status": rng.choice(["paid", "shipped", "delivered", "refunded"]),
    }


def _reading(rng: random.Random, i: int) -> dict:
    return {
        "timestamp": _timestamp(rng),
        "sensor": f"s-{rng.randint(1, 64):02d}",
        "temperature_c": round(rng.gauss(21, 6), 1),
        "humidity_pct": rng.randint(15, 95),
        "battery_v": round(rng.uniform(2.9, 3.3), 2),
    }


def _log_event(rng: random.Random, i: int) -> dict:
    return {
        "ts": _timestamp(rng),
        "level": rng.choice(_LEVELS),
        "service": rng.choice(_SERVICES),
        "message": rng.choice(_MESSAGES),
        "latency_ms": rng.randint(1, 3000),
        "status": rng.choice([200, 200, 200, 201, 204, 400, 404, 500, 503]),
    }


_RECORD_KINDS: list[tuple[str, Callable[[random.Random, int], dict]]] = [
    ("people", _person),
    ("products", _product),
    ("orders", _order),
    ("sensor_readings", _reading),
    ("log_events", _log_event),
]


def _flatten(record: dict) -> dict:
    """CSV cells for a record: nested values become compact JSON in one cell."""
    return {
        k: json.dumps(v, separators=(",", ":")) if isinstance(v, list | dict) else v
        for k, v in record.items()
    }


def data_records(seed: int) -> Iterator[tuple[str, str]]:
    """Endless `(text, source)` pairs, each a small table as JSON, JSON Lines or CSV."""
    rng = random.Random(f"moelab-data-{seed}")
    for index in itertools.count():
        kind, make = _RECORD_KINDS[rng.randrange(len(_RECORD_KINDS))]
        records = [make(rng, i + 1) for i in range(rng.randint(3, 20))]
        fmt = ("json", "jsonl", "csv")[rng.randrange(3)]
        if fmt == "json":
            text = json.dumps({kind: records}, indent=2) + "\n"
        elif fmt == "jsonl":
            text = "".join(json.dumps(r) + "\n" for r in records)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(_flatten(r) for r in records)
            text = buf.getvalue()
        yield text, f"data:{kind}.{fmt}:{index}"
