//! The stage graph, pure: default (sequential) wiring, validation, topological order.
//!
//! No types, no threads: just indices and names, so every definition error is tested
//! exhaustively here.
//!
//! Sequential default wiring, in definition order: a stage "has explicit inputs" when it has a
//! `from` or is the target of a `to`; it "has explicit outputs" when it has a `to` or some stage
//! names it in `from`. Walking the stages in order, producers and stages without explicit
//! outputs are *open*; the next non-producer stage without explicit inputs takes every open
//! stage as its upstreams (so several producers each feed the next stage). Consumers are never
//! open: their output is `()`. A dead-letter edge counts as an explicit input of its target,
//! and so does a declared route from a stage defined before the target (a stage fed by a
//! router takes nothing by definition order); a route back to a stage defined earlier (a
//! routing loop's edge back to its entry) does not, so a loop's entry stage is still fed by
//! the stage before it. A route's source keeps its own default output.

use crate::error::DefinitionError;
use crate::stage::StageKind;

/// The graph as the builder declared it, references already resolved to indices.
#[derive(Debug, Default, Clone)]
pub(crate) struct Declared {
    pub(crate) names: Vec<String>,
    pub(crate) kinds: Vec<StageKind>,
    /// Explicit `from` edges: `from[v]` are upstreams of `v`.
    pub(crate) from: Vec<Vec<usize>>,
    /// Explicit `to` edges: `to[u]` are downstreams of `u`.
    pub(crate) to: Vec<Vec<usize>>,
    /// Dead-letter and route edges (upstream, target): they feed but take no default part.
    pub(crate) side: Vec<(usize, usize)>,
    /// The route edges among `side`: a cycle through one of them is a routing loop (allowed,
    /// with loop termination); a cycle of other edges only is a definition error.
    pub(crate) routes: Vec<(usize, usize)>,
    /// Sub-pipelines: the innermost sub-pipeline of each stage (empty: none anywhere).
    pub(crate) sub_of: Vec<Option<usize>>,
    /// The parent of each sub-pipeline.
    pub(crate) sub_parent: Vec<Option<usize>>,
    /// Explicit edges with a sub-pipeline at one end or both.
    pub(crate) port_edges: Vec<(Port, Port)>,
    /// Stages marked as entries of their sub-pipeline (`StageRef::entry`).
    pub(crate) entry: Vec<bool>,
    /// Rerouted stages with no new downstream: they feed nothing by default.
    pub(crate) sealed: Vec<usize>,
    /// Rerouted sub-pipelines: they feed nothing by default either.
    pub(crate) sealed_subs: Vec<usize>,
}

/// One end of an explicit edge: a stage, or a whole sub-pipeline (its entry stages as a
/// downstream, its exit stages as an upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Stage(usize),
    Sub(usize),
}

/// Entry and exit stages of a sub-pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SubIo {
    pub(crate) entries: Vec<usize>,
    pub(crate) exits: Vec<usize>,
}

/// The wired graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wired {
    /// Data edges (upstream, downstream), in a stable order, without duplicates.
    pub(crate) edges: Vec<(usize, usize)>,
    /// Stage indices in topological order (loops: in definition order at their place).
    pub(crate) order: Vec<usize>,
    /// Routing loops: the stages of each strongly connected component with a cycle.
    pub(crate) loops: Vec<Vec<usize>>,
    /// The edges among `edges` that only the sequential default wiring made (for messages
    /// that say how to wire otherwise).
    pub(crate) defaults: Vec<(usize, usize)>,
    /// Entries and exits of each sub-pipeline.
    pub(crate) subs: Vec<SubIo>,
}

impl Declared {
    pub(crate) fn wire(&self, pipeline: &str) -> Result<Wired, DefinitionError> {
        let n = self.names.len();
        let mut seen = std::collections::HashSet::new();
        for name in &self.names {
            if !seen.insert(name.as_str()) {
                return Err(DefinitionError::DuplicateName {
                    pipeline: pipeline.to_string(),
                    name: name.clone(),
                });
            }
        }
        let mut edges: Vec<(usize, usize)> = Vec::new();
        for v in 0..n {
            for &u in &self.from[v] {
                push_edge((u, v), &mut edges);
            }
        }
        for u in 0..n {
            for &v in &self.to[u] {
                push_edge((u, v), &mut edges);
            }
        }
        let mut defaults = Vec::new();
        let subs = self.wire_defaults(&mut edges, &mut defaults);
        for &(u, v) in &edges {
            if self.kinds[v] == StageKind::Producer {
                return Err(DefinitionError::ProducerHasInput {
                    stage: self.names[v].clone(),
                    upstream: self.names[u].clone(),
                });
            }
        }
        let all: Vec<(usize, usize)> = edges.iter().chain(self.side.iter()).copied().collect();
        for v in 0..n {
            if self.kinds[v] != StageKind::Producer && !all.iter().any(|&(_, d)| d == v) {
                return Err(DefinitionError::Unfed {
                    stage: self.names[v].clone(),
                });
            }
        }
        let (order, loops) = self.order_with_loops(&all)?;
        Ok(Wired {
            edges,
            defaults,
            order,
            loops,
            subs,
        })
    }

    fn sub(&self, v: usize) -> Option<usize> {
        self.sub_of.get(v).copied().flatten()
    }

    /// Whether stage `v` is inside sub-pipeline `g` (at any depth).
    fn inside(&self, v: usize, g: usize) -> bool {
        let mut s = self.sub(v);
        while let Some(x) = s {
            if x == g {
                return true;
            }
            s = self.sub_parent[x];
        }
        false
    }

    /// The item of scope `scope` (None = the pipeline itself) that holds stage `v`.
    fn item_in(&self, v: usize, scope: Option<usize>) -> Option<Port> {
        let mut g = self.sub(v);
        if g == scope {
            return Some(Port::Stage(v));
        }
        while let Some(x) = g {
            if self.sub_parent[x] == scope {
                return Some(Port::Sub(x));
            }
            g = self.sub_parent[x];
        }
        None
    }

    /// Sequential default wiring, scope by scope from the innermost sub-pipelines out; in
    /// each scope a sub-pipeline is one node (its entries as inputs, its exits as outputs).
    /// Also expands explicit edges to and from sub-pipelines. Returns each one's entries and
    /// exits.
    fn wire_defaults(
        &self,
        edges: &mut Vec<(usize, usize)>,
        defaults: &mut Vec<(usize, usize)>,
    ) -> Vec<SubIo> {
        let dead: Vec<(usize, usize)> = self
            .side
            .iter()
            .filter(|e| !self.routes.contains(e))
            .copied()
            .collect();
        let mut io: Vec<Option<SubIo>> = vec![None; self.sub_parent.len()];
        let mut expanded = vec![false; self.port_edges.len()];
        for scope in self.scopes_innermost_first() {
            self.wire_scope(scope, &dead, &io, edges, defaults);
            self.expand_port_edges(&io, &mut expanded, edges);
            if let Some(g) = scope {
                io[g] = Some(self.sub_io(g, &dead, edges));
            }
        }
        io.into_iter().map(Option::unwrap_or_default).collect()
    }

    /// Every sub-pipeline, deepest first, then the pipeline itself (`None`).
    fn scopes_innermost_first(&self) -> Vec<Option<usize>> {
        let depth = |g: usize| {
            let (mut d, mut c) = (0, Some(g));
            while let Some(x) = c {
                d += 1;
                c = self.sub_parent[x];
            }
            d
        };
        let mut scopes: Vec<Option<usize>> = (0..self.sub_parent.len()).map(Some).collect();
        scopes.sort_by_key(|s| std::cmp::Reverse(s.map_or(0, depth)));
        scopes.push(None);
        scopes
    }

    /// The sequential rule inside one scope: walking its items (stages and the sub-pipelines
    /// directly in it) in definition order, the next item that takes input and has no
    /// explicit input takes every open item as its upstreams.
    fn wire_scope(
        &self,
        scope: Option<usize>,
        dead: &[(usize, usize)],
        io: &[Option<SubIo>],
        edges: &mut Vec<(usize, usize)>,
        defaults: &mut Vec<(usize, usize)>,
    ) {
        let mut items: Vec<Port> = Vec::new();
        for v in 0..self.names.len() {
            if let Some(it) = self.item_in(v, scope) {
                if !items.contains(&it) {
                    items.push(it);
                }
            }
        }
        let mut open: Vec<usize> = Vec::new();
        for &it in &items {
            let ins = self.port_inputs(it, io);
            if !ins.is_empty() && !self.explicit_in(it, dead) {
                for &u in &open {
                    for &v in &ins {
                        if !edges.contains(&(u, v)) {
                            edges.push((u, v));
                            defaults.push((u, v));
                        }
                    }
                }
                open.clear();
            }
            if !self.explicit_out(it) {
                open.extend(self.port_outputs(it, io));
            }
        }
    }

    /// Expands the explicit edges whose sub-pipelines are all wired inside by now.
    fn expand_port_edges(
        &self,
        io: &[Option<SubIo>],
        expanded: &mut [bool],
        edges: &mut Vec<(usize, usize)>,
    ) {
        let ready = |p: Port| match p {
            Port::Stage(_) => true,
            Port::Sub(g) => io[g].is_some(),
        };
        for (k, &(a, b)) in self.port_edges.iter().enumerate() {
            if !expanded[k] && ready(a) && ready(b) {
                expanded[k] = true;
                for u in self.port_outputs(a, io) {
                    for v in self.port_inputs(b, io) {
                        push_edge((u, v), edges);
                    }
                }
            }
        }
    }

    /// A wired sub-pipeline's entries and exits.
    fn sub_io(&self, g: usize, dead: &[(usize, usize)], edges: &[(usize, usize)]) -> SubIo {
        let members: Vec<usize> = (0..self.names.len())
            .filter(|&v| self.inside(v, g))
            .collect();
        // Entries: marked ones, and the others that nothing feeds explicitly and that have no
        // upstream inside (a dead-letter stage, a stage fed from outside by an explicit edge,
        // is not an entry).
        let entries = members
            .iter()
            .copied()
            .filter(|&m| {
                self.kinds[m] != StageKind::Producer
                    && (self.entry.get(m).copied().unwrap_or(false)
                        || (!self.explicit_in(Port::Stage(m), dead)
                            && !edges.iter().any(|&(u, d)| d == m && self.inside(u, g))))
            })
            .collect();
        // Exits: stages with no downstream inside and no explicit (or rerouted) output.
        let exits = members
            .iter()
            .copied()
            .filter(|&m| {
                self.kinds[m] != StageKind::Consumer
                    && !self.explicit_out(Port::Stage(m))
                    && !edges.iter().any(|&(s, d)| s == m && self.inside(d, g))
            })
            .collect();
        SubIo { entries, exits }
    }

    /// Whether an item has explicit inputs: a `from`, the target of a `to`, of a dead-letter
    /// edge (`dead`), of a route from a stage defined before it, or of an edge to a
    /// sub-pipeline, or (a stage) marked as an entry.
    fn explicit_in(&self, p: Port, dead: &[(usize, usize)]) -> bool {
        match p {
            Port::Stage(v) => {
                self.entry.get(v).copied().unwrap_or(false)
                    || !self.from[v].is_empty()
                    || self.to.iter().any(|t| t.contains(&v))
                    || dead.iter().any(|&(_, d)| d == v)
                    || self.routes.iter().any(|&(u, d)| d == v && u < v)
                    || self.port_edges.iter().any(|&(_, b)| b == p)
            }
            Port::Sub(_) => self.port_edges.iter().any(|&(_, b)| b == p),
        }
    }

    /// Whether an item has explicit outputs (or was rerouted to none).
    fn explicit_out(&self, p: Port) -> bool {
        match p {
            Port::Stage(u) => {
                self.sealed.contains(&u)
                    || !self.to[u].is_empty()
                    || self.from.iter().any(|f| f.contains(&u))
                    || self.port_edges.iter().any(|&(a, _)| a == p)
            }
            Port::Sub(g) => {
                self.sealed_subs.contains(&g) || self.port_edges.iter().any(|&(a, _)| a == p)
            }
        }
    }

    /// The stages an item's input goes to (a sub-pipeline's entries, once it is wired).
    fn port_inputs(&self, p: Port, io: &[Option<SubIo>]) -> Vec<usize> {
        match p {
            Port::Stage(v) if self.kinds[v] == StageKind::Producer => Vec::new(),
            Port::Stage(v) => vec![v],
            Port::Sub(g) => io[g]
                .as_ref()
                .map(|x| x.entries.clone())
                .unwrap_or_default(),
        }
    }

    /// The stages an item's output comes from (a sub-pipeline's exits, once it is wired).
    fn port_outputs(&self, p: Port, io: &[Option<SubIo>]) -> Vec<usize> {
        match p {
            Port::Stage(v) if self.kinds[v] == StageKind::Consumer => Vec::new(),
            Port::Stage(v) => vec![v],
            Port::Sub(g) => io[g].as_ref().map(|x| x.exits.clone()).unwrap_or_default(),
        }
    }

    /// Topological order; cycles are allowed only through a route edge. Returns the order of
    /// the condensed graph (each loop's stages in definition order) and the loops.
    fn order_with_loops(
        &self,
        all: &[(usize, usize)],
    ) -> Result<(Vec<usize>, Vec<Vec<usize>>), DefinitionError> {
        if let Ok(order) = self.topo(all) {
            return Ok((order, Vec::new()));
        }
        let comp = components(self.names.len(), all);
        let ncomp = comp.iter().max().map_or(0, |m| m + 1);
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); ncomp];
        for (v, &c) in comp.iter().enumerate() {
            members[c].push(v);
        }
        let mut loops = Vec::new();
        for m in &members {
            let cyclic = m.len() > 1 || all.contains(&(m[0], m[0]));
            if !cyclic {
                continue;
            }
            let inside = |&(u, v): &(usize, usize)| comp[u] == comp[m[0]] && comp[v] == comp[m[0]];
            if !self.routes.iter().any(inside) {
                // A static cycle: name it as before.
                let static_edges: Vec<(usize, usize)> =
                    all.iter().copied().filter(inside).collect();
                return Err(self
                    .topo(&static_edges)
                    .expect_err("the component has a cycle"));
            }
            if let Some(&a) = m.iter().find(|&&v| self.kinds[v] == StageKind::Accumulator) {
                return Err(DefinitionError::AccumulatorInLoop {
                    stage: self.names[a].clone(),
                });
            }
            loops.push(m.clone());
        }
        // Condensed graph: edges between components, topologically sorted.
        let cedges: Vec<(usize, usize)> = all
            .iter()
            .filter(|&&(u, v)| comp[u] != comp[v])
            .map(|&(u, v)| (comp[u], comp[v]))
            .collect();
        let mut indeg = vec![0usize; ncomp];
        for &(_, d) in &cedges {
            indeg[d] += 1;
        }
        let mut ready: Vec<usize> = (0..ncomp).filter(|&c| indeg[c] == 0).collect();
        ready.sort_by_key(|&c| members[c][0]);
        let mut order = Vec::with_capacity(self.names.len());
        while !ready.is_empty() {
            let c = ready.remove(0);
            order.extend(&members[c]);
            for &(s, d) in &cedges {
                if s == c {
                    indeg[d] -= 1;
                    if indeg[d] == 0 {
                        ready.push(d);
                        ready.sort_by_key(|&c| members[c][0]);
                    }
                }
            }
        }
        Ok((order, loops))
    }

    /// Kahn's algorithm; on a cycle, names the stages of one cycle in order.
    fn topo(&self, edges: &[(usize, usize)]) -> Result<Vec<usize>, DefinitionError> {
        let n = self.names.len();
        let mut indeg = vec![0usize; n];
        for &(_, v) in edges {
            indeg[v] += 1;
        }
        let mut ready: std::collections::VecDeque<usize> =
            (0..n).filter(|&v| indeg[v] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(u) = ready.pop_front() {
            order.push(u);
            for &(s, d) in edges {
                if s == u {
                    indeg[d] -= 1;
                    if indeg[d] == 0 {
                        ready.push_back(d);
                    }
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        // Walk backwards along remaining edges from any stage left: we must revisit one.
        let left: Vec<bool> = (0..n).map(|v| indeg[v] > 0).collect();
        let start = (0..n)
            .find(|&v| left[v])
            .expect("a stage is left on a cycle");
        let mut path = vec![start];
        let mut cur = start;
        loop {
            let prev = edges
                .iter()
                .find(|&&(s, d)| d == cur && left[s])
                .map(|&(s, _)| s)
                .expect("a stage on a cycle has an upstream on it");
            if let Some(pos) = path.iter().position(|&x| x == prev) {
                let mut cycle: Vec<usize> = path[pos..].to_vec();
                cycle.reverse();
                return Err(DefinitionError::Cycle {
                    stages: cycle.into_iter().map(|i| self.names[i].clone()).collect(),
                });
            }
            path.push(prev);
            cur = prev;
        }
    }
}

/// Adds an edge once.
fn push_edge(e: (usize, usize), edges: &mut Vec<(usize, usize)>) {
    if !edges.contains(&e) {
        edges.push(e);
    }
}

/// Strongly connected components (Tarjan, iterative): the component index of each node.
fn components(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut adj = vec![Vec::new(); n];
    for &(u, v) in edges {
        adj[u].push(v);
    }
    let (mut index, mut low, mut on) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut comp, mut stack, mut next, mut ncomp) = (vec![usize::MAX; n], Vec::new(), 0, 0);
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work = vec![(root, 0usize)];
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            if *i == 0 {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on[v] = true;
            }
            if let Some(&w) = adj[v].get(*i) {
                *i += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                while let Some(w) = stack.pop() {
                    on[w] = false;
                    comp[w] = ncomp;
                    if w == v {
                        break;
                    }
                }
                ncomp += 1;
            }
        }
    }
    comp
}

#[cfg(test)]
#[path = "graph_tests.rs"]
mod tests;
