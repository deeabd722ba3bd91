//! The workspace-dependency graph between steps: a step depends on the producer (the step whose
//! `output` it is) of each of its inputs. Iterative algorithms only: a pipeline file is
//! untrusted input, so no recursion depth proportional to its size.

use std::collections::{BTreeMap, BTreeSet};

use super::Step;

/// For each step, the indices of the steps it depends on (sorted, without itself).
pub(super) fn predecessors(steps: &[Step]) -> Vec<Vec<usize>> {
    let mut producer: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, step) in steps.iter().enumerate() {
        if let Some(output) = step.output.as_deref() {
            // The first writer wins; a second writer is a validation error of its own.
            producer.entry(output).or_insert(index);
        }
    }
    steps
        .iter()
        .enumerate()
        .map(|(index, step)| {
            let preds: BTreeSet<usize> = step
                .inputs
                .iter()
                .filter_map(|input| producer.get(input.as_str()).copied())
                .filter(|&p| p != index)
                .collect();
            preds.into_iter().collect()
        })
        .collect()
}

/// Kahn's algorithm, ready steps taken lowest index first. Returns the order and the steps
/// that never became ready (those in or downstream of a cycle), ascending.
pub(super) fn topological_order(preds: &[Vec<usize>]) -> (Vec<usize>, Vec<usize>) {
    let mut waiting_on: Vec<usize> = preds.iter().map(Vec::len).collect();
    let mut successors: Vec<Vec<usize>> = vec![Vec::new(); preds.len()];
    for (index, step_preds) in preds.iter().enumerate() {
        for &p in step_preds {
            if let Some(succ) = successors.get_mut(p) {
                succ.push(index);
            }
        }
    }
    let mut ready: BTreeSet<usize> = (0..preds.len())
        .filter(|&i| waiting_on.get(i) == Some(&0))
        .collect();
    let mut order = Vec::with_capacity(preds.len());
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for &succ in successors.get(next).map_or(&[][..], Vec::as_slice) {
            if let Some(count) = waiting_on.get_mut(succ) {
                *count -= 1;
                if *count == 0 {
                    ready.insert(succ);
                }
            }
        }
    }
    let done: BTreeSet<usize> = order.iter().copied().collect();
    let rest = (0..preds.len()).filter(|i| !done.contains(i)).collect();
    (order, rest)
}

/// Cycles among `rest` (the second result of [`topological_order`]), each in dependency
/// direction (producer before reader) and starting at its lowest step index. Every node of
/// `rest` has a predecessor in `rest`, so walking predecessors always closes a cycle; one cycle
/// is reported per walk, which finds at least one per strongly connected group.
pub(super) fn cycles(preds: &[Vec<usize>], rest: &[usize]) -> Vec<Vec<usize>> {
    let stuck: BTreeSet<usize> = rest.iter().copied().collect();
    let mut explored: BTreeSet<usize> = BTreeSet::new();
    let mut found = Vec::new();
    for &start in rest {
        if explored.contains(&start) {
            continue;
        }
        let mut path: Vec<usize> = Vec::new();
        let mut position: BTreeMap<usize, usize> = BTreeMap::new();
        let mut current = Some(start);
        while let Some(node) = current {
            if let Some(&at) = position.get(&node) {
                let mut cycle: Vec<usize> = path.get(at..).unwrap_or_default().to_vec();
                // The walk went from reader to producer; report producer → reader.
                cycle.reverse();
                if let Some(lowest) = cycle.iter().enumerate().min_by_key(|(_, n)| **n) {
                    let shift = lowest.0;
                    cycle.rotate_left(shift);
                }
                found.push(cycle);
                break;
            }
            if explored.contains(&node) {
                break;
            }
            position.insert(node, path.len());
            path.push(node);
            current = preds
                .get(node)
                .and_then(|p| p.iter().copied().find(|q| stuck.contains(q)));
        }
        explored.extend(path);
    }
    found
}
