"""Writes sensitive.tsv: labelled samples for the sensitive-data classifier (type, then value; type
`none` for look-alikes that are not sensitive). Synthetic, seeded, reproducible:
    python3 apisec/tests/corpus/generate_sensitive.py > apisec/tests/corpus/sensitive.tsv
"""

import base64
import ipaddress
import json
import random
import string

rng = random.Random(20261201)
rows = []


def luhn_digit(body):
    total = 0
    for i, d in enumerate(reversed(body)):
        v = int(d)
        if i % 2 == 0:
            v *= 2
            if v > 9:
                v -= 9
        total += v
    return str((10 - total % 10) % 10)


def card(prefix, length):
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def group(number, sep):
    if sep is None:
        return number
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4))


IBAN = {"DE": 22, "GB": 22, "FR": 27, "NL": 18, "ES": 24, "IT": 27, "CH": 21, "BE": 16, "PL": 28, "SE": 24}


def iban(country, valid=True):
    length = IBAN[country]
    bban = "".join(rng.choice(string.ascii_uppercase if (country in ("GB", "NL") and i < 4) else string.digits)
                   for i in range(length - 4))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    if not valid:
        check = (check % 97) + 1 if check != 97 else 2
    return f"{country}{check:02d}{bban}"


def spaced(s):
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4))


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def word(n):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


for _ in range(60):
    user = rng.choice([word(6), f"{word(4)}.{word(6)}", f"{word(5)}+{word(3)}", f"{word(3)}_{rng.randint(1, 99)}"])
    rows.append(("email", f"{user}@{word(7)}.{rng.choice(['com', 'io', 'co.uk', 'example', 'org'])}"))
for _ in range(60):
    cc = rng.choice(["1", "44", "49", "33", "81", "61", "91"])
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(8, 11)))
    digits = str(rng.randint(1, 9)) + digits[1:]
    rows.append(("phone", rng.choice([f"+{cc}{digits}", f"+{cc} {digits[:3]} {digits[3:6]} {digits[6:]}", f"+{cc}-{digits[:4]}-{digits[4:]}"])))
for _ in range(60):
    area = rng.choice([a for a in range(1, 900) if a != 666])
    rows.append(("us_ssn", f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"))
for _ in range(80):
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15), ("6011", 16), ("65", 16), ("3530", 16), ("62", 16)])
    rows.append(("payment_card", group(card(prefix, length), rng.choice([None, " ", "-"]))))
for _ in range(60):
    v = iban(rng.choice(list(IBAN)))
    rows.append(("iban", rng.choice([v, spaced(v)])))
for _ in range(60):
    header = b64({"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"})
    claims = b64({"sub": word(8), "iat": rng.randint(1_600_000_000, 1_800_000_000)})
    sig = base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode()
    rows.append(("jwt", f"{header}.{claims}.{sig}"))
for _ in range(40):
    rows.append(("aws_access_key", rng.choice(["AKIA", "ASIA"]) + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16))))
for _ in range(20):
    kind = rng.choice(["", "RSA ", "EC ", "OPENSSH "])
    body = base64.b64encode(rng.randbytes(48)).decode()
    rows.append(("private_key", f"-----BEGIN {kind}PRIVATE KEY-----\\n{body}\\n-----END {kind}PRIVATE KEY-----"))
for _ in range(60):
    if rng.random() < 0.6:
        rows.append(("ip_address", str(ipaddress.IPv4Address(rng.randint(0x01000000, 0xDFFFFFFF)))))
    else:
        rows.append(("ip_address", str(ipaddress.IPv6Address(rng.getrandbits(128) | (0x2001 << 112)))))

# Look-alikes and ordinary values.
for _ in range(60):  # Luhn-invalid card-shaped numbers
    n = card("4", 16)
    bad = n[:-1] + str((int(n[-1]) + rng.randint(1, 9)) % 10)
    rows.append(("none", group(bad, rng.choice([None, " ", "-"]))))
for _ in range(40):  # invalid SSNs
    rows.append(("none", rng.choice([f"000-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}", f"666-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                                     f"9{rng.randint(10, 99)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}", f"{rng.randint(100, 899)}-00-{rng.randint(1000, 9999)}"])))
for _ in range(40):  # IBANs with a wrong check
    rows.append(("none", iban(rng.choice(list(IBAN)), valid=False)))
for _ in range(40):  # order numbers, timestamps, versions, UUIDs, hashes, dates, prices
    rows.append(("none", rng.choice([
        f"ORD-{rng.randint(100000, 999999)}", str(rng.randint(1_600_000_000_000, 1_800_000_000_000)),
        f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}", str(__import__('uuid').UUID(int=rng.getrandbits(128))),
        "".join(rng.choice("0123456789abcdef") for _ in range(40)), f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}", f"12:{rng.randint(10, 59)}:{rng.randint(10, 59)}",
    ])))
for _ in range(40):  # words and sentences
    rows.append(("none", " ".join(word(rng.randint(3, 9)) for _ in range(rng.randint(1, 5)))))
for _ in range(30):  # almost-emails, almost-phones, almost-JWTs, almost-keys
    rows.append(("none", rng.choice([
        f"{word(5)}@localhost", f"{word(5)}@@{word(4)}.com", f"@{word(6)}", f"{word(4)}.{word(3)}",
        "+0" + "".join(rng.choice(string.digits) for _ in range(9)), "+12345",
        f"{word(12)}.{word(10)}.{word(8)}", "AKIA" + word(16).upper().replace("1", "X"),
        "AKIA" + "".join(rng.choice(string.ascii_uppercase) for _ in range(10)),
        "0.0.0.0", "999.1.1.1", "1.2.3", "0000 0000 0000 0000", "1111111111111111",
    ])))

for t, v in rows:
    assert "\t" not in v and "\n" not in v
    print(f"{t}\t{v}")
