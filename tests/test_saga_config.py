"""``[[sagas]]`` in the config: a mistake is named by its key path; a good one routes to the saga's virtual sink."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrand.config import load_config
from integrand.errors import ConfigError
from integrand.events import Event
from integrand.routes import Router

from .helpers import DEMO_SECRET, write_config

SOURCES = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"

[sinks.a]
connector = "jsonl"
path = "var/a.jsonl"
"""


def problems(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, SOURCES + body))
    return e.value.problems


def test_a_saga_routes_its_events_to_its_runner(tmp_path: Path) -> None:
    s = load_config(
        write_config(
            tmp_path,
            SOURCES
            + """
[[sagas]]
name = "sync"
from = "demo"
filter = { type = ["order.*"] }

[[sagas.steps]]
name = "first"
sink = "a"
map = { key = "data.key", up = "steps.first.id" }
compensate = { sink = "a", type = "order.deleted", map = { id = "step.id" } }
""",
        )
    )
    [sg] = s.sagas
    assert sg.virtual_sink == "~saga:sync" and [st.name for st in sg.steps] == ["first"]
    router = Router(s.routes, s.sagas)
    assert router.sinks_for(Event(id="1", source="demo", type="order.created", data={})) == ["~saga:sync"]
    assert router.sinks_for(Event(id="2", source="demo", type="invoice.created", data={})) == []
    assert not any("no route sends" in w for w in s.warnings)


def test_every_mistake_is_named_by_its_key(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
[[sagas]]
name = "sync"
from = "demoo"

[[sagas.steps]]
name = "first"
sink = "nope"
map = { key = { path = "data.key", convert = "lowr" } }
compensate = { sink = "gone" }

[[sagas.steps]]
name = "first"
sink = "a"
""",
    )
    assert any(p.startswith("sagas[0].steps[0].map.key.convert: unknown conversion 'lowr'") for p in found), found
    found = problems(
        tmp_path,
        '[[sagas]]\nname = "s"\nfrom = "demo"\n[[sagas.steps]]\nname = "x"\nsink = "a"\n'
        '[[sagas.steps]]\nname = "x"\nsink = "a"\n',
    )
    assert any("step names must be unique within a saga: x" in p for p in found), found
    found = problems(
        tmp_path,
        """
[[sagas]]
name = "sync"
from = "demoo"

[[sagas.steps]]
name = "first"
sink = "nope"
map = { key = "data.key" }
compensate = { sink = "gone" }
""",
    )
    assert "sagas[0].from: no source named 'demoo'" in found
    assert "sagas[0].steps[0].sink: no sink named 'nope'" in found
    assert "sagas[0].steps[0].compensate.sink: no sink named 'gone'" in found
    found = problems(tmp_path, '[[sagas]]\nname = "has space"\nfrom = "demo"\nsteps = []\n')
    assert any(p.startswith("sagas[0].name") for p in found), found
    assert any(p.startswith("sagas[0].steps") for p in found), found
