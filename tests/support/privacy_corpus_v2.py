"""A labelled corpus of whole chat requests for `detect_request`: national formats, evasions, hard negatives.

CASES: each `Case` is a request (messages, request-level extras) with the kind a detector must report, or
None for a hard negative that must raise nothing. Values are fake: numbers are drawn from a seeded
`random.Random` and kept only when their check digit passes (or, for negatives, fails); the check-digit
functions themselves are tested against published examples in test_detector_formats.py. Vendor prefixes are
split across literals so secret scanners leave the file alone.
"""

# ruff: noqa: E501  (the value tables read best one sample per line, as written)
from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from routing import checksums
from routing.privacy import DetectorKind as K

_RNG = random.Random(20261122)


@dataclass(frozen=True)
class Case:
    label: str  # the format or evasion, e.g. "email/fullwidth-at"
    kind: K | None  # None: a hard negative
    messages: list[dict[str, object]]
    extras: tuple[object, ...] = field(default=())


def _user(text: str) -> list[dict[str, object]]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _draw(n: int, make: Callable[[], str], ok: Callable[[str], bool]) -> list[str]:
    found: list[str] = []
    while len(found) < n:
        value = make()
        if ok(value) and value not in found:
            found.append(value)
    return found


def _digits(n: int, first: str = "123456789") -> str:
    return _RNG.choice(first) + "".join(_RNG.choice("0123456789") for _ in range(n - 1))


# --- values ------------------------------------------------------------------------------------------------

EMAILS = ["jane.doe@example.com", "m.kowalski@firma.example.pl", "r_singh42@mail.example.in",
          "claire.martin@exemple.fr", "ops+alerts@corp.example.io", "h.mueller@beispiel.de"]  # fmt: skip
CARDS = ["4111111111111111", "5500000000000004", "4012888888881881", "5105105105105100", "6011000990139424",
         "3530111333300000"]  # fmt: skip
NIRS = _draw(
    8,
    lambda: (f"{_RNG.choice('12')}{_RNG.randint(40, 99):02}{_RNG.randint(1, 12):02}{_RNG.randint(1, 95):02}"
             f"{_RNG.randint(1, 999):03}{_RNG.randint(1, 999):03}"),
    lambda v: True,
)  # fmt: skip
NIRS = [v + f"{97 - int(v) % 97:02}" for v in NIRS]
STEUER_IDS = _draw(8, lambda: _digits(11), checksums.steuer_id_ok)
AADHAARS = _draw(10, lambda: _digits(12, "23456789"), checksums.aadhaar_ok)
BSNS = _draw(8, lambda: _digits(9), checksums.bsn_ok)
PANS = ["ABCPE1234F", "BNZPM2501F", "AAACR5055K", "DXKPS7843Q", "GHTPK0923L", "AFZPK7190K"]
UK_MOBILES = ["07700 900123", "07700900456", "07911 123456", "07400 123457", "07123 456789"]
FR_PHONES = ["05 56 12 34 56", "05.56.78.90.12", "0612345678", "06 12 34 56 78", "01 42 68 53 00"]
DE_PHONES = ["0151/23456789", "0151 23456789", "0170 1234567", "030 12345678", "(089) 1234567"]
IN_PHONES = ["92793 71425", "98765 43210", "9123456789", "070123 45678", "81234-56789"]
OTHER_PHONES = ["612 345 678", "347 123 4567", "06-12345678", "0612 345678"]
PRIVATE_PORTS = ["10.0.0.5:5432", "192.168.1.20:8080", "172.16.4.2:9200", "10.20.30.40:6379",
                 "192.168.0.10:22", "10.1.2.3:3306"]  # fmt: skip
SLACK_WEBHOOKS = ["https://hooks.slack.com/services/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",
                  "https://hooks.slack.com/services/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",
                  "https://hooks.slack.com/workflows/T01A2B3C4D5/A05F6G7H8J9/472611234567890/a9Bc8De7Fg6Hi5Jk"]  # fmt: skip
XAPP = ["xa" + "pp-1-A01ABCDEF12-1234567890123-abcdef0123456789abcdef0123456789abcdef01",
        "xa" + "pp-1-A05K9QWERTY-5829301928374-9f8e7d6c5b4a39281706f5e4d3c2b1a0"]  # fmt: skip
DB_URLS = ["postgres://app:s3cr3tPw@db.internal:5432/app", "mysql://root:Tr0ub4dor&3@10.0.2.15/shop",
           "mongodb+srv://svc:hunter2hunter2@cluster0.example.net/prod", "redis://:Zq8xWv2p@cache:6379/0",
           "amqp://guest:K9mLp2Qr@rabbit.internal:5672/"]  # fmt: skip
_PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
        "-----END RSA PRIVATE KEY-----\n")  # fmt: skip
_PEM_EC = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oDS3Bk2OM2u3oAoGCCqGSM49\n"
IBANS = ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606"]

_PROSE = ["Please update the customer record: {v}.", "My details: {v} (keep this private)",
          "Le client a donné {v} hier.", "Bitte prüfen: {v}", "kindly verify {v} before onboarding",
          '{{"field": "{v}"}}', "value={v}\nnext line", "- contact: {v}"]  # fmt: skip


def _say(values: list[str], kind: K, label: str, intro: str = "") -> list[Case]:
    return [Case(label, kind, _user(_RNG.choice(_PROSE).format(v=intro + v))) for v in values]


def _fmt_nir(v: str) -> str:
    return f"{v[0]} {v[1:3]} {v[3:5]} {v[5:7]} {v[7:10]} {v[10:13]} {v[13:]}"


def _group(v: str, sizes: tuple[int, ...], sep: str = " ") -> str:
    parts, at = [], 0
    for size in sizes:
        parts.append(v[at : at + size])
        at += size
    return sep.join(parts)


def national_formats() -> list[Case]:
    cases = [Case("nir", K.NATIONAL_ID, _user(f"numéro de sécurité sociale {_fmt_nir(v)}")) for v in NIRS[:4]]
    cases += _say(NIRS[4:], K.NATIONAL_ID, "nir")
    cases += [Case("steuer-id", K.NATIONAL_ID, _user(f"Steuer-IdNr. {_group(v, (2, 3, 3, 3))}"))
              for v in STEUER_IDS[:4]]  # fmt: skip
    cases += _say(STEUER_IDS[4:], K.NATIONAL_ID, "steuer-id", "Steuer-ID ")
    cases += [Case("aadhaar", K.NATIONAL_ID, _user(f"Aadhaar {_group(v, (4, 4, 4))}")) for v in AADHAARS[:4]]
    cases += _say([_group(v, (4, 4, 4), "-") for v in AADHAARS[4:7]], K.NATIONAL_ID, "aadhaar")
    cases += [Case("aadhaar/labelled", K.NATIONAL_ID, _user(f"my aadhaar no: {v}")) for v in AADHAARS[7:]]
    cases += _say(PANS, K.NATIONAL_ID, "pan", "PAN ")
    cases += [Case("bsn/labelled", K.NATIONAL_ID, _user(f"BSN: {v}")) for v in BSNS[:4]]
    cases += [Case("bsn/dotted", K.NATIONAL_ID, _user(f"burgerservicenummer {_group(v, (4, 2, 3), '.')}"))
              for v in BSNS[4:]]  # fmt: skip
    phones = UK_MOBILES + FR_PHONES + DE_PHONES + IN_PHONES + OTHER_PHONES
    cases += [Case("phone/national", K.PHONE, _user(_RNG.choice(_PROSE).format(v=v))) for v in phones]
    cases += [Case("phone/nbsp", K.PHONE, _user(f"ruf an {v.replace(' ', chr(0xA0))}"))
              for v in ("+49 151 23456789", "07700 900123", "05 56 12 34 56", "92793 71425")]  # fmt: skip
    cases += _say(PRIVATE_PORTS, K.IP_ADDRESS, "ipv4:port", "server ")
    cases += [Case("ipv4:port/config", K.IP_ADDRESS, _user(f"upstream app {{ server {v}; }}"))
              for v in PRIVATE_PORTS[:3]]  # fmt: skip
    cases += _say(SLACK_WEBHOOKS + XAPP, K.API_KEY, "slack")
    cases += _say(DB_URLS, K.API_KEY, "db-url-password", "DATABASE_URL=")
    secret = f"apiVersion: v1\nkind: Secret\ndata:\n  tls.key: {_b64(_PEM)}\n"
    cases += [Case("pem/base64-k8s", K.PRIVATE_KEY, _user(secret)),
              Case("pem/base64-env", K.PRIVATE_KEY, _user(f"SSH_KEY_B64={_b64(_PEM_EC)}"))]  # fmt: skip
    return cases


_FULLWIDTH = str.maketrans("0123456789@", "０１２３４５６７８９＠")
_ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
_DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


def _sprinkle(v: str, mark: str) -> str:
    """`mark` inside `v`, at two places a reader would not see it."""
    a, b = sorted(_RNG.sample(range(1, len(v)), 2))
    return v[:a] + mark + v[a:b] + mark + v[b:]


_TEXT_EVASIONS: dict[str, Callable[[str], str]] = {
    "fullwidth": lambda v: v.translate(_FULLWIDTH),
    "zero-width": lambda v: _sprinkle(v, "\u200b"),
    "soft-hyphen": lambda v: _sprinkle(v, "\u00ad"),
    "word-joiner": lambda v: _sprinkle(v, "\u2060"),
    "percent": lambda v: quote(v, safe=""),
    "base64": _b64,
    "html-entity": lambda v: v.translate(str.maketrans({"@": "&#64;", "4": "&#52;"})),
}
_CARD_EVASIONS: dict[str, Callable[[str], str]] = {
    "dots": lambda v: _group(v, (4, 4, 4, 4), "."),
    "slashes": lambda v: _group(v, (4, 4, 4, 4), "/"),
    "nbsp": lambda v: _group(v, (4, 4, 4, 4), "\u00a0"),
    "narrow-nbsp": lambda v: _group(v, (4, 4, 4, 4), "\u202f"),
    "zero-width": lambda v: _group(v, (4, 4, 4, 4), "\u200b"),
    "arabic-indic": lambda v: _group(v, (4, 4, 4, 4)).translate(_ARABIC),
    "devanagari": lambda v: v.translate(_DEVANAGARI),
}


def evasions() -> list[Case]:
    cases = []
    for name, hide in _TEXT_EVASIONS.items():
        cases += [Case(f"email/{name}", K.EMAIL, _user(f"write to {hide(v)}")) for v in EMAILS[:4]]
        cases += [Case(f"card/{name}", K.CREDIT_CARD, _user(f"card {hide(v)}")) for v in CARDS[:3]]
    for name, hide in _CARD_EVASIONS.items():
        cases += [Case(f"card/{name}", K.CREDIT_CARD, _user(f"pay with {hide(v)} please")) for v in CARDS]
    idn = ["jürgen@bücher.example", "josé@correo.españa.example", "user@пример.example", "李@例子.example"]
    cases += [Case("email/idn", K.EMAIL, _user(f"contact {v}")) for v in idn]
    cases += [Case("email/small-at", K.EMAIL, _user(f"mail {v.replace('@', '﹫')}")) for v in EMAILS[:2]]
    cases += [Case("iban/nbsp", K.IBAN, _user(f"IBAN {_group(v, (4,) * 7, chr(0xA0))}")) for v in IBANS]
    cases += [Case("phone/fullwidth", K.PHONE, _user("tel " + "+44 20 7946 0958".translate(_FULLWIDTH)))]
    nested = quote(_b64("card 4111 1111 1111 1111"), safe="")
    cases.append(Case("card/base64-in-percent", K.CREDIT_CARD, _user(f"q={nested}")))
    return cases


def _split(v: str) -> tuple[str, str]:
    at = _RNG.randint(2, len(v) - 2)
    return v[:at], v[at:]


def splits() -> list[Case]:
    cases = []
    for v in EMAILS + [_group(c, (4, 4, 4, 4)) for c in CARDS] + UK_MOBILES[:2]:
        kind = K.EMAIL if "@" in v else K.PHONE if v.startswith("0") else K.CREDIT_CARD
        a, b = _split(v)
        parts = [{"type": "text", "text": f"note: {a}"}, {"type": "text", "text": f"{b} thanks"}]
        cases.append(Case(f"{kind}/split-parts", kind, [{"role": "user", "content": parts}]))
        a, b = _split(v)
        two = [{"role": "user", "content": f"first half {a}"}, {"role": "user", "content": f"{b} end"}]
        cases.append(Case(f"{kind}/split-messages", kind, two))
    a, b, c = "jane.doe", "@examp", "le.com"
    three = [{"type": "text", "text": a}, {"type": "text", "text": b}, {"type": "text", "text": c}]
    cases.append(Case("email/split-three-parts", K.EMAIL, [{"role": "user", "content": three}]))
    return cases


def _tool_call(arguments: object) -> dict[str, object]:
    return {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}


def _fields(v: str) -> dict[str, tuple[list[dict[str, object]], tuple[object, ...]]]:
    """Where a value can ride in a request, besides the content string."""
    hi = {"role": "user", "content": "hi"}
    data_url = "data:text/plain;base64," + _b64(f"note {v}")
    tool = {"type": "function", "function": {"name": "f", "description": f"sends to {v}", "parameters": {}}}
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"examples": [v]}}}
    return {
        "name": ([{"role": "user", "name": v, "content": "hello"}], ()),
        "args-object": ([{"role": "assistant", "tool_calls": [_tool_call({"to": v})]}], ()),
        "args-string": ([{"role": "assistant", "tool_calls": [_tool_call(f'{{"to": "{v}"}}')]}], ()),
        "function-call": ([{"role": "assistant", "function_call": {"name": "f", "arguments": {"x": v}}}], ()),
        "refusal": ([{"role": "assistant", "content": None, "refusal": f"I will not use {v}"}], ()),
        "image-url": ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"https://img.example/?q={quote(v)}"}}]}], ()),
        "data-url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}], ()),
        "unknown-field": ([{"role": "user", "content": "hi", "metadata": {"crm": [v]}}], ()),
        "tool-message": ([{"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": v}]}],
                         ()),
        "stop": ([hi], ([v, "END"],)),
        "tool-description": ([hi], ([tool],)),
        "response-format": ([hi], (schema,)),
    }  # fmt: skip


def fields() -> list[Case]:
    values = {K.EMAIL: EMAILS[0], K.CREDIT_CARD: _group(CARDS[1], (4, 4, 4, 4)), K.PHONE: "+44 20 7946 0958",
              K.IBAN: "DE89 3704 0044 0532 0130 00", K.NATIONAL_ID: "078-05-1120"}  # fmt: skip
    return [
        Case(f"{kind}/{where}", kind, messages, extras)
        for kind, v in values.items()
        for where, (messages, extras) in _fields(v).items()
    ] + [Case("card/args-number", K.CREDIT_CARD, [{"role": "assistant", "tool_calls": [
        _tool_call({"card": int(CARDS[0])})]}])]  # fmt: skip


# --- hard negatives ----------------------------------------------------------------------------------------

HARD_NEGATIVES = [
    "Order #4478201938 shipped on 2024-11-21.", "invoice no. 2024-000187 is overdue", "ISBN 978-3-16-148410-0",
    "ISBN-10 0-306-40615-2", "tracking number 1Z999AA10123456784", "timestamp 2026-11-21T10:30:45.123Z",
    "epoch 1732185045 seconds, or 1732185045123 ms", "upgrade to v10.0.0.1 first", "release 2.14.3 (build 20241121)",
    "version 1.2.3.4 of the firmware", "sha1 3f786850e387550fdab836ed7e6dc881de23001b",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "digest sha256:4bcdf3a5b8c3e0d1f2a9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6",
    "UUID 123e4567-e89b-12d3-a456-426614174000", "request 7f0c2e9a-41d3-4b1e-9c55-0f6a8d2b7e13 failed",
    "commit a1b2c3d4 fixes issue #1234", "the loop runs 1000000 times", "pi is 3.14159265358979323846",
    "Total: €1.234.567,89 including VAT", "coordinates 48.858844, 2.294351", "room 0.04 of building 12",
    "SKU-0012-3345-9981", "part no. 0812-44-9921-03", "ticket 123456782 was closed",
    "The meeting is on 05/06/2024 at 10:30.", "Meeting 2024-06-05 10:30-11:45", "dates: 01.02.2024 - 15.03.2024",
    "@app.route('/users/<int:user_id>')", "npm i @types/node@20.11.5", "@media (max-width: 600px) { }",
    "ping @jane in #ops", "50%25 off, 30% today", "progress: 100%", "SELECT * FROM users WHERE id = 42;",
    "for i in range(10): print(i * 1000003)", "x = 0xDEADBEEF; y = 0o755", "matrix [[1, 0], [0, 1]]",
    "postgres://user:password@localhost:5432/db", "postgres://${DB_USER}:${DB_PASSWORD}@db/app",
    "mysql://root:<password>@localhost/app", "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
    "xa" + "pp-your-app-token-here", "kind: Secret\ndata:\n  username: YWRtaW4=\n", "image: nginx:1.27.2-alpine",
    "listen 0.0.0.0:8080 and 127.0.0.1:9090", "base64 of hello world is aGVsbG8gd29ybGQ=",
    "payload " + _b64("the quick brown fox jumps over the lazy dog"), "encoded " + _b64("status: ok, retries: 3"),
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    "sha256 base64 47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "the word pneumonoultramicroscopicsilicovolcanoconiosis",
    "Le rendez-vous est à 14h30, salle 204.", "Die Lieferung kommt in 3–5 Werktagen, Bestellnummer folgt.",
    "मुझे ३ किलो चावल और २ लीटर दूध चाहिए", "اشتريت ٣ تفاحات و ٥ برتقالات", "全角の数字 １２３ と　スペース",
    "ｆｕｌｌ－ｗｉｄｔｈ ｔｅｘｔ ｗｉｔｈｏｕｔ ａｎｙ ｄａｔａ", "emoji 👩‍💻 and zero\u200bwidth joiner",
    "soft\u00adhyphen\u00adated words", "bücher.example is an IDN domain", "visit https://例子.example/path",
    "phone-like but invalid: 0000 000000", "call 00 00 00 00 00", "fax 0123", "ext. 4471",
    "NIR example with a bad key: 1 84 12 76 451 089 47", "Steuer-ID 86 095 742 718 (typo)",
    "ratio 4111:1111 in the mix", "coverage 41.11%, 11.11%, 11.11%", "IPv6 scope std::vector<int>::iterator",
    "the function returns 4111111111111112", "numbers 1234 5678 9012 3456", "PAN card format AAAAA9999A",
    "version string 2024.11.21.1530", "build 5.4.3.210 (x86_64)", "lat/long 40.7128/-74.0060",
    "ARN arn:aws:iam::123456789012:role/Admin", "AWS account 123456789012 in us-east-1",
    "public DNS server is one of the well-known resolvers", "stack trace at line 1532, column 17",
    "HTTP/1.1 200 OK\nContent-Length: 1532", "Order 98765 43210 dispatched", "qty 6123 45678 units",
]  # fmt: skip


def _bad(n: int, make: Callable[[], str], ok: Callable[[str], bool]) -> list[str]:
    return _draw(n, make, lambda v: not ok(v))


def generated_negatives() -> list[str]:
    """Numbers in the shapes of the national formats whose check digit fails, and random digit runs."""
    texts = [f"ref {_group(v, (4, 4, 4))} noted" for v in _bad(12, lambda: _digits(12, "23456789"),
                                                                 checksums.aadhaar_ok)]  # fmt: skip
    texts += [f"value {v}" for v in _bad(12, lambda: _digits(11), checksums.steuer_id_ok)]
    texts += [
        f"code {_fmt_nir(v)}" for v in _bad(8, lambda: _RNG.choice("12") + _digits(14), checksums.nir_ok)
    ]
    texts += [f"bsn {v}" for v in _bad(8, lambda: _digits(9), checksums.bsn_ok)]
    texts += [f"card {_group(v, (4, 4, 4, 4), _RNG.choice(' .-/'))}"
              for v in _bad(12, lambda: "4" + _digits(15, "0123456789"), checksums.card_number_ok)]  # fmt: skip
    texts += [f"sample {_RNG.randint(1, 10**6)} of {_RNG.randint(10**6, 10**8)}" for _ in range(10)]
    texts += [f"job took {_RNG.randint(100, 9999)} ms at 2026-11-21T{_RNG.randint(10, 23)}:{_RNG.randint(10, 59)}:05Z"
              for _ in range(6)]  # fmt: skip
    texts += [_b64(t) for t in ("harmless note about the weather", "build passed on the main branch",
                                "please reply before friday", "tests: 412 passed, 3 skipped")]  # fmt: skip
    return texts


_SEAM_NEGATIVES = [
    ("Step 1", "2. Install the package"),
    ("Total: 4111", "22 items"),
    ("We have 0151", "reasons"),
    ("version 10.0", ".0.1 is out"),
    ("mail me", "tomorrow at noon"),
    ("count 1234 5678", "9012 rows"),
]


def negatives() -> list[Case]:
    cases = [Case("hard-negative", None, _user(t)) for t in HARD_NEGATIVES + generated_negatives()]
    for a, b in _SEAM_NEGATIVES:
        cases.append(
            Case("seam-negative", None, [{"role": "user", "content": a}, {"role": "user", "content": b}])
        )
    hi = [{"role": "user", "content": "hi"}]
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {}}},
        },
    }
    cases += [Case("request-fields-negative", None, hi, (["\n\n", "END"], [tool], {"type": "json_object"})),
              Case("request-fields-negative", None, [{"role": "assistant", "tool_calls": [
                  _tool_call({"city": "Paris", "days": 3})]}])]  # fmt: skip
    return cases


# Written after the detectors were tuned on the cases above and kept as they scored (see the report in
# docs/BENCHMARKS.md): realistic prompts, not shaped to the patterns.
REALISTIC_POSITIVES = [
    (K.PHONE, "Hi, this is Tom from accounts, you can reach me on 07911 123456 after 5pm."),
    (K.PHONE, "Mon portable : 06 98 76 54 32, sinon laissez un message."),
    (K.PHONE, "Erreichbar unter 0171 2345678 oder per Fax 089 12345678."),
    (K.PHONE, "Customer callback number 98450 12345 (Bangalore office)"),
    (K.PHONE, "Teléfono de contacto: 654 321 987"),
    (K.PHONE, "Rufnummer: 030/12345678"),
    (K.PHONE, "Call the Sydney desk on (02) 9374 4000."),
    (K.PHONE, "WhatsApp: 0044 7911 123 456"),
    (K.NATIONAL_ID, "Patient: M. Durand, n° SS 2 69 05 49 588 157 80, né le 12/05/1969"),
    (K.NATIONAL_ID, "Bitte tragen Sie Ihre steuerliche Identifikationsnummer 47 036 892 816 ein."),
    (K.NATIONAL_ID, "KYC: Aadhaar 4991 1866 5246, PAN BNZAA2318J"),
    (K.NATIONAL_ID, "Mijn BSN is 123456782, mag dat in het formulier?"),
    (K.NATIONAL_ID, "employee SSN 536-22-8413 for payroll"),
    (K.IP_ADDRESS, "the DB is at 10.12.0.7:5432 behind the bastion"),
    (K.IP_ADDRESS, "curl http://192.168.49.2:30080/healthz returns 503"),
    (
        K.API_KEY,
        "SLACK_WEBHOOK_URL=https://hooks.slack.com/services/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",
    ),
    (K.API_KEY, "engine = create_engine('postgresql+psycopg://report:Wint3r-is-C0ming@10.0.4.2/bi')"),
    (K.API_KEY, "SLACK_APP_TOKEN=xa" + "pp-1-A06B7C8D9E0-6123456789012-0a1b2c3d4e5f60718293a4b5c6d7e8f9"),
    (K.EMAIL, "Forward this to ｐｒｉｙａ．ｓｈａｒｍａ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
    (K.EMAIL, "contact: anna\\u0040example.org"),
    (K.CREDIT_CARD, "Kartennummer ٥٥٠٠ ٠٠٠٠ ٠٠٠٠ ٠٠٠٤ gültig bis 12/27"),
    (K.CREDIT_CARD, "my card: 4111\u20081111\u20081111\u20081111"),
    (K.IBAN, "Überweisung an DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000"),
    (
        K.PRIVATE_KEY,
        "ssh_key: " + _b64("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n"),
    ),
]
REALISTIC_NEGATIVES = [
    "Can you refactor this? def total(xs): return sum(x * 1.19 for x in xs)",
    "Our Q3 revenue was 4,512,300 EUR, up 12.4% on Q2; headcount 1,204.",
    "Error 0x80070005 when running setup.exe (build 22631.4460)",
    "Call graph: main -> parse(0) -> eval(12) -> print(3)",
    "Docker: docker run -p 8080:80 -v /data:/var/lib/data nginx:1.27",
    "kubectl get pods -n prod --field-selector=status.phase=Running",
    "Train for 100000 steps with lr 3e-4, batch 256, seed 1234567",
    "The 2024 census counted 8 336 817 residents in the city.",
    "Flight LH 2024 departs 06:45, gate B 12, seat 23A",
    "Please translate: 'Le train de 07 h 12 part du quai 3.'",
    "csv: id,qty,price\n10021,3,9.99\n10022,12,4.50",
    "Apache Kafka 3.7.0 changelog: KAFKA-15432, KAFKA-15501 fixed",
    "the hash of the block is 0000000000000000000244f7c5f3a8f1b9d5f6e2a2c8b4d1e3f5a7c9b1d3e5f7",
    "regex ^\\+?[0-9 ]{7,15}$ validates phone fields",
    "CVE-2024-3094 affects xz 5.6.0 and 5.6.1",
    "ISO 8601 durations like P3Y6M4DT12H30M5S",
    "Our support line is in the footer of the website",
    "Use the placeholder email name@example.com? No, leave it blank.",
    "zip code 75008, Paris; SIRET will follow",
    "order total 1 299,00 € (TVA 20 %)",
]


def realistic() -> list[Case]:
    positives = [Case("realistic", k, _user(t)) for k, t in REALISTIC_POSITIVES]
    return positives + [Case("realistic-negative", None, _user(t)) for t in REALISTIC_NEGATIVES]


def all_cases() -> list[Case]:
    return national_formats() + evasions() + splits() + fields() + negatives() + realistic()


CASES = all_cases()
