"""The one registry pattern: lazy module import, one error naming the option and the choices."""

import sys

import pytest

from makd.errors import MakdError
from makd.registry import Registry


def test_entries_register_where_defined_and_modules_load_on_first_lookup(tmp_path, monkeypatch):
    (tmp_path / "makd_test_plugin.py").write_text(
        "from makd_test_registry import THINGS\n\n@THINGS.register('b', needs_x=True)\ndef b():\n    return 2\n")
    (tmp_path / "makd_test_registry.py").write_text(
        "from makd.registry import Registry\nTHINGS = Registry('thing', 'section.thing', modules=('makd_test_plugin',))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from makd_test_registry import THINGS

    assert "makd_test_plugin" not in sys.modules  # nothing imported until a lookup
    assert THINGS.names() == ["b"] and "makd_test_plugin" in sys.modules
    assert THINGS.get("b")() == 2 and THINGS.entry("b").info == {"needs_x": True}
    with pytest.raises(MakdError, match=r"^section.thing: unknown thing 'c' \(choose from b\)$"):
        THINGS.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        THINGS.register("b")(lambda: 3)


@pytest.mark.parametrize("module, registry, names", [
    ("makd.teachers.registry", "TEACHERS", {"bridge", "hf", "openai", "text"}),
    ("makd.data.registry", "DATASETS", {"fashion_mnist", "imagefolder", "manifest"}),
    ("makd.losses", "LOSSES", {"ce", "aspect_bce", "kd", "dkd", "lskd"}),
    ("makd.questions.llm", "LLM_BACKENDS", {"smollm2", "hf", "openai"}),
    ("makd.teachers.text", "TEXT_BACKENDS", {"hf", "openai"}),
])
def test_every_kind_of_extension_uses_it(module, registry, names):
    import importlib

    found = getattr(importlib.import_module(module), registry)
    assert isinstance(found, Registry) and names <= set(found.names())


def test_a_lookup_from_another_thread_waits_for_every_module_of_the_registry(tmp_path, monkeypatch):
    """Two threads building teachers at once: the second must not see the registry half loaded."""
    import threading
    import time

    (tmp_path / "makd_slow_registry.py").write_text(
        "from makd.registry import Registry\n"
        "SLOW = Registry('slow thing', 'x.name', modules=('makd_slow_first', 'makd_slow_second'))\n")
    (tmp_path / "makd_slow_first.py").write_text(
        "from makd_slow_registry import SLOW\nSLOW.register('first')(1)\nassert SLOW.names() == ['first']\n")
    (tmp_path / "makd_slow_second.py").write_text(
        "import time\ntime.sleep(0.3)\nfrom makd_slow_registry import SLOW\nSLOW.register('second')(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from makd_slow_registry import SLOW

    found = {}
    first = threading.Thread(target=lambda: found.setdefault("a", SLOW.names()))
    first.start()
    deadline = time.time() + 30
    while "makd_slow_first" not in sys.modules and time.time() < deadline:  # the first thread is inside the imports
        time.sleep(0.001)
    found["b"] = SLOW.get("second")
    first.join()
    assert found == {"a": ["first", "second"], "b": 2}
