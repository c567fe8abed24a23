"""No import cycle anywhere in cdc_sink, cdc_recon and cdc_synth (no services)."""

from __future__ import annotations

import grimp

PACKAGES = ("cdc_sink", "cdc_recon", "cdc_synth")


def cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """One shortest cycle through each import that closes one, as the modules it passes."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                found.append((importer, *back))
    return found


def test_no_module_imports_itself_through_others() -> None:
    """Every import between the three packages' modules (TYPE_CHECKING and function-level
    imports included) points one way: no chain of imports leads back to where it began."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert cycles(graph) == []


def test_a_cycle_is_found() -> None:
    """The check sees a cycle: one import added against the grain closes one."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    graph.add_import(importer="cdc_sink.model.events", imported="cdc_sink.apply.plan")
    assert ("cdc_sink.apply.plan", "cdc_sink.model.events", "cdc_sink.apply.plan") in cycles(graph)
