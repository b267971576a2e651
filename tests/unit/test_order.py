"""Start order, stop order and dependency cycles, on plain name graphs."""

from supervisor.policy.order import find_cycles, start_layers, stop_order


def test_no_cycles_in_a_tree():
    assert find_cycles({"A": [], "B": ["A"], "C": ["A", "B"]}) == []


def test_cycle_starts_at_the_first_agent_in_order():
    assert find_cycles({"A": ["B"], "B": ["C"], "C": ["A"]}) == [["A", "B", "C", "A"]]
    assert find_cycles({"C": ["A"], "A": ["B"], "B": ["C"]}) == [["C", "A", "B", "C"]]


def test_self_dependency_is_a_cycle():
    assert find_cycles({"A": ["A"]}) == [["A", "A"]]


def test_each_cycle_reported_once():
    deps = {"A": ["B"], "B": ["A"], "C": ["A", "B"], "D": ["E"], "E": ["D", "E"]}
    assert find_cycles(deps) == [["A", "B", "A"], ["D", "E", "D"], ["E", "E"]]


def test_unknown_dependencies_are_ignored():
    assert find_cycles({"A": ["Nope"], "B": ["A", "Gone"]}) == []
    assert start_layers({"A": ["Nope"], "B": ["A", "Gone"]}) == [["A"], ["B"]]


def test_start_layers_sorted_within_a_layer():
    deps = {"Tutor": ["Memory"], "Memory": [], "Cache": ["Memory"], "Web": ["Cache", "Tutor"], "Auth": []}
    assert start_layers(deps) == [["Auth", "Memory"], ["Cache", "Tutor"], ["Web"]]


def test_stop_order_stops_dependants_first():
    deps = {"Hub": [], "Registry": [], "Coordinator": ["Registry"], "Web": ["Coordinator", "Hub"]}
    assert stop_order(deps) == [["Web"], ["Coordinator"], ["Hub", "Registry"]]


def test_agents_on_a_cycle_are_left_out_of_the_order():
    assert start_layers({"A": [], "B": ["C"], "C": ["B"], "D": ["B"]}) == [["A"]]


def test_long_chain_does_not_recurse():
    deps = {f"a{i}": [f"a{i + 1}"] for i in range(5000)}
    deps["a5000"] = ["a0"]
    (cycle,) = find_cycles(deps)
    assert len(cycle) == 5002 and cycle[0] == cycle[-1] == "a0"
