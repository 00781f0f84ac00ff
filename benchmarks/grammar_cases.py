"""The constraints the grammar benchmarks use: 11 JSON schemas, a regex, a choice list and a Lark grammar, each with a
valid instance and probes (strings an engine should accept or reject). Shared by benchmarks/grammar_backends.py
(llguidance vs xgrammar, in its own venv) and benchmarks/structured_outputs.py (attnserve's own compile times), so it
imports nothing beyond the standard library."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

@dataclass
class Case:
    name: str
    kind: str                      # json | regex | choice | lark
    spec: object                   # schema dict, regex str, list of choices, or Lark text
    valid: str                     # the instance walked token by token
    probes: list[tuple[str, bool, str]] = field(default_factory=list)   # (text, should accept, what it tests)


def _large_schema() -> tuple[dict, dict]:
    rng = random.Random(7)
    props, inst, required = {}, {}, []
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "bounded", "object"]
    for i in range(50):
        k = kinds[i % len(kinds)]
        key = f"field_{i:02d}_{k}"
        if k == "string":
            props[key], inst[key] = {"type": "string", "maxLength": 40}, f"value {rng.randint(0, 999)}"
        elif k == "integer":
            props[key], inst[key] = {"type": "integer"}, rng.randint(-5000, 5000)
        elif k == "number":
            props[key], inst[key] = {"type": "number"}, round(rng.uniform(-10, 10), 3)
        elif k == "boolean":
            props[key], inst[key] = {"type": "boolean"}, rng.random() < 0.5
        elif k == "enum":
            props[key], inst[key] = {"enum": ["low", "medium", "high", "critical"]}, "medium"
        elif k == "array":
            props[key], inst[key] = {"type": "array", "items": {"type": "string"}, "maxItems": 5}, ["a", "bc"]
        elif k == "bounded":
            props[key], inst[key] = {"type": "integer", "minimum": 0, "maximum": 100}, rng.randint(0, 100)
        else:
            props[key] = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                          "required": ["x", "y"], "additionalProperties": False}
            inst[key] = {"x": 1.5, "y": -2}
        if i % 2 == 0:
            required.append(key)
    return {"type": "object", "properties": props, "required": required}, inst


def cases() -> list[Case]:
    def d(obj) -> str:
        return json.dumps(obj, ensure_ascii=False)

    out: list[Case] = []

    person = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"}, "is_member": {"type": "boolean"}},
        "required": ["name", "age", "email"]}
    p = {"name": "José Álvarez", "age": 42, "email": "jose.alvarez@example.com", "is_member": True}
    out.append(Case("person", "json", person, d(p), [
        (d({**p, "age": 200}), False, "maximum"),
        (d({**p, "email": "not-an-email"}), False, "format: email"),
        (d({"name": "A", "age": 3, "email": "a@b.co"}), True, "optional property left out"),
        (d({**p, "nickname": "Pepe"}), True, "extra property (additionalProperties not given)"),
        (d({"age": 42, "name": "José", "email": "j@x.org"}), True, "properties out of declared order"),
        (json.dumps({**p, "name": "José"}), True, "\\u00e9 escape in a string"),
    ]))

    order = {"type": "object", "properties": {
        "order_id": {"type": "string"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string"},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"]}},
            "required": ["name", "address"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 10, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "qty", "price"]}},
        "gift": {"type": "boolean"}}, "required": ["order_id", "customer", "items"]}
    item = {"sku": "ABC-1234", "qty": 2, "price": 19.99}
    o = {"order_id": "ord_8812", "customer": {"name": "Dana Smith", "address": {
        "street": "12 Elm Street", "city": "Springfield", "zip": "12345"}},
        "items": [item, {"sku": "XYZ-0042", "qty": 1, "price": 5}, {"sku": "QRS-9000", "qty": 10, "price": 0.5}],
        "gift": False}
    out.append(Case("nested_order", "json", order, d(o), [
        (d({**o, "items": []}), False, "minItems"),
        (d({**o, "items": [item] * 11}), False, "maxItems"),
        (d({**o, "items": [{**item, "sku": "AB-1234"}]}), False, "pattern"),
        (d({**o, "items": [{**item, "qty": 0}]}), False, "minimum"),
    ]))

    enums = {"type": "object", "properties": {
        "status": {"enum": ["open", "in_progress", "blocked", "closed"]},
        "priority": {"type": "integer", "enum": [1, 2, 3, 5, 8]},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "kind": {"const": "ticket"}, "labels": {"type": "array", "items": {"enum": ["bug", "ui", "perf"]}}},
        "required": ["status", "priority", "color", "kind"]}
    e = {"status": "in_progress", "priority": 5, "color": "green", "kind": "ticket", "labels": ["bug", "perf"]}
    out.append(Case("enums", "json", enums, d(e), [
        (d({**e, "status": "archived"}), False, "enum"),
        (d({**e, "priority": 4}), False, "integer enum"),
        (d({**e, "kind": "task"}), False, "const"),
    ]))

    anyof = {"type": "object", "properties": {
        "amount": {"type": "number"},
        "method": {"anyOf": [
            {"type": "object", "properties": {"type": {"const": "card"}, "number": {"type": "string",
             "pattern": "^[0-9]{16}$"}, "expiry": {"type": "string"}}, "required": ["type", "number", "expiry"]},
            {"type": "object", "properties": {"type": {"const": "bank"}, "iban": {"type": "string"}},
             "required": ["type", "iban"]},
            {"type": "null"}]}}, "required": ["amount", "method"]}
    a = {"amount": 129.5, "method": {"type": "bank", "iban": "DE89370400440532013000"}}
    out.append(Case("anyof_payment", "json", anyof, d(a), [
        (d({"amount": 1, "method": None}), True, "anyOf null branch"),
        (d({"amount": 1, "method": {"type": "card", "number": "4111111111111111", "expiry": "12/29"}}), True,
         "anyOf card branch"),
        (d({"amount": 1, "method": {"type": "cash"}}), False, "no anyOf branch"),
    ]))

    tree = {"$defs": {"comment": {"type": "object", "properties": {
        "author": {"type": "string"}, "text": {"type": "string"},
        "replies": {"type": "array", "items": {"$ref": "#/$defs/comment"}}}, "required": ["author", "text"]},
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "handle": {"type": "string"}},
                 "required": ["id", "handle"]}},
        "type": "object", "properties": {"owner": {"$ref": "#/$defs/user"},
                                         "thread": {"type": "array", "items": {"$ref": "#/$defs/comment"}}},
        "required": ["owner", "thread"]}
    t = {"owner": {"id": 7, "handle": "kim"}, "thread": [
        {"author": "ann", "text": "Looks good to me.", "replies": [
            {"author": "bob", "text": "Agreed, merging.", "replies": []}]},
        {"author": "cy", "text": "One nit: rename the flag."}]}
    out.append(Case("defs_ref_recursive", "json", tree, d(t), [
        (d({"owner": {"id": 7, "handle": "kim"}, "thread": [{"author": "a", "replies": []}]}), False,
         "required inside $ref"),
        (d({"owner": {"id": "7", "handle": "kim"}, "thread": []}), False, "type inside $ref"),
    ]))

    bounds = {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180},
        "altitude_m": {"type": "integer", "minimum": -500, "maximum": 9000},
        "temp_c": {"type": "number", "exclusiveMinimum": -273.15},
        "floor": {"type": "integer", "minimum": 0, "maximum": 163}},
        "required": ["lat", "lon", "altitude_m", "temp_c", "floor"]}
    b = {"lat": 47.3769, "lon": 8.5417, "altitude_m": 408, "temp_c": -3.5, "floor": 12}
    out.append(Case("numeric_bounds", "json", bounds, d(b), [
        (d({**b, "lat": 91.5}), False, "number maximum"),
        (d({**b, "altitude_m": 9001}), False, "integer maximum"),
        (d({**b, "altitude_m": -501}), False, "integer minimum"),
        (d({**b, "temp_c": -300}), False, "exclusiveMinimum"),
        (d({**b, "floor": 2.5}), False, "integer type"),
        (d({**b, "lat": 47.3769123}), True, "7 decimal digits in a bounded number"),
    ]))

    strings = {"type": "object", "properties": {
        "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$"},
        "password": {"type": "string", "minLength": 8, "maxLength": 64},
        "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
        "bio": {"type": "string", "maxLength": 120}},
        "required": ["username", "password", "zip", "bio"]}
    s = {"username": "river_song42", "password": "correct horse battery", "zip": "94107-1234",
         "bio": "Archaeologist. Likes spoilers, tea and long walks."}
    out.append(Case("string_constraints", "json", strings, d(s), [
        (d({**s, "username": "Ab"}), False, "pattern"),
        (d({**s, "password": "short"}), False, "minLength"),
        (d({**s, "bio": "x" * 121}), False, "maxLength"),
        (d({**s, "zip": "9410"}), False, "pattern with optional group"),
        (d({**s, "bio": 'Says "hi"'}), True, "escaped quote in a maxLength string"),
    ]))

    formats = {"type": "object", "properties": {
        "title": {"type": "string"}, "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"},
        "organizer": {"type": "string", "format": "email"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["title", "start", "end", "organizer"]}
    f = {"title": "Design review", "start": "2026-12-04T09:30:00Z", "end": "2026-12-04T10:15:00+01:00",
         "day": "2026-12-04", "organizer": "pat.lee@example.org", "id": "3f1c2a9e-8b7d-4c6e-9f10-2a3b4c5d6e7f"}
    out.append(Case("formats", "json", formats, d(f), [
        (d({**f, "start": "tomorrow at nine"}), False, "format: date-time"),
        (d({**f, "start": "2026-13-45T09:30:00Z"}), False, "date-time month 13"),
        (d({**f, "organizer": "pat@"}), False, "format: email"),
        (d({**f, "id": "not-a-uuid"}), False, "format: uuid"),
    ]))

    tools = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": {
            "type": "object", "properties": {"city": {"type": "string"},
                                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": False}}, "required": ["name", "parameters"]},
        {"properties": {"name": {"type": "string", "enum": ["search_web"]}, "parameters": {
            "type": "object", "properties": {"query": {"type": "string"},
                                             "max_results": {"type": "integer", "minimum": 1, "maximum": 20}},
            "required": ["query"], "additionalProperties": False}}, "required": ["name", "parameters"]},
        {"properties": {"name": {"type": "string", "enum": ["send_email"]}, "parameters": {
            "type": "object", "properties": {"to": {"type": "array", "items": {"type": "string",
                                                                               "format": "email"}},
                                             "subject": {"type": "string"}, "body": {"type": "string"}},
            "required": ["to", "subject", "body"], "additionalProperties": False}},
         "required": ["name", "parameters"]}]}}
    tc = [{"name": "get_weather", "parameters": {"city": "Zurich", "unit": "celsius"}},
          {"name": "search_web", "parameters": {"query": "attnserve grammar backend", "max_results": 5}},
          {"name": "send_email", "parameters": {"to": ["ops@example.com"], "subject": "Status",
                                                "body": "All green.\nSee you."}}]
    out.append(Case("tool_calls", "json", tools, d(tc), [
        (d([{"name": "delete_all", "parameters": {}}]), False, "function name enum"),
        (d([]), False, "minItems 1"),
        (d([{"name": "get_weather", "parameters": {"query": "x"}}]), False,
         "parameters of another tool (additionalProperties false)"),
    ]))

    closed = {"type": "object", "properties": {
        "service": {"type": "string"}, "replicas": {"type": "integer", "minimum": 1},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "limits": {"type": "object", "properties": {"cpu": {"type": "string"}, "memory": {"type": "string"}},
                   "additionalProperties": False}},
        "required": ["service", "replicas"], "additionalProperties": False}
    c = {"service": "api", "replicas": 3, "env": {"LOG_LEVEL": "info", "REGION": "eu-west-1"},
         "limits": {"cpu": "500m", "memory": "1Gi"}}
    out.append(Case("additional_props_false", "json", closed, d(c), [
        (d({**c, "debug": True}), False, "additionalProperties false (top)"),
        (d({**c, "limits": {"cpu": "1", "gpu": "1"}}), False, "additionalProperties false (nested)"),
        (d({**c, "env": {"X": 1}}), False, "additionalProperties schema"),
    ]))

    large, li = _large_schema()
    out.append(Case("large_50_props", "json", large, d(li), [
        (d({k: v for k, v in li.items() if k != "field_00_string"}), False, "required property missing"),
        (d({**li, "field_06_bounded": 101}), False, "maximum"),
    ]))

    out.append(Case("regex_logline", "regex",
                    r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} (INFO|WARN|ERROR) [a-z_.]+: [A-Za-z0-9 ,.'()-]{1,80}",
                    "2026-12-04 09:30:12 WARN engine.scheduler: preempted 3 requests (KV cache at 97)", [
                        ("2026-12-04 09:30:12 DEBUG x: y", False, "alternation"),
                        ("2026-12-04 09:30:12 INFO a: " + "b" * 81, False, "bounded repeat"),
                    ]))

    choices = ["positive", "negative", "neutral", "mixed", "not applicable", "strongly positive",
               "strongly negative", "unsure"]
    out.append(Case("choice", "choice", choices, "strongly negative", [
        ("strongly", False, "prefix of a choice"), ("neutral", True, "another choice"),
    ]))

    lark = r"""
start: select
select: "SELECT " columns " FROM " NAME where? order? ";"
columns: "*" | NAME (", " NAME)*
where: " WHERE " cond (" AND " cond)*
cond: NAME " " OP " " value
order: " ORDER BY " NAME (" ASC" | " DESC")?
value: NUMBER | STRING
OP: "=" | "<" | ">" | "<=" | ">=" | "!="
NAME: /[a-z_][a-z0-9_]*/
NUMBER: /-?[0-9]+(\.[0-9]+)?/
STRING: /'[^']*'/
"""
    out.append(Case("lark_sql", "lark", lark.strip() + "\n",
                    "SELECT id, name, created_at FROM users WHERE age >= 21 AND country = 'CH' ORDER BY name ASC;",
                    [("SELECT FROM users;", False, "missing columns"), ("SELECT * FROM t;", True, "star")]))
    return out


def regex_of_choices(choices: list[str]) -> str:
    return "(" + "|".join(re.sub(r"([^A-Za-z0-9 ])", r"\\\1", c) for c in choices) + ")"
