//! The component registry: type name -> constructor, per role. Adding a component is
//! one module and one line in a table below.
mod debug;
mod ebpf;
mod file;

use anyhow::{Result, bail};
use config::{ComponentId, ComponentSection};

use crate::pipeline::{MetricsExporter, Processor, Receiver};

type Factory<T> = fn(&ComponentId, ComponentSection) -> Result<T>;

const RECEIVERS: &[(&str, Factory<Box<dyn Receiver>>)] = &[("ebpf", ebpf::build)];

const PROCESSORS: &[(&str, Factory<Box<dyn Processor>>)] = &[];

const EXPORTERS: &[(&str, Factory<Box<dyn MetricsExporter>>)] =
    &[("debug", debug::build), ("file", file::build)];

fn build<T>(
    role: &str,
    table: &[(&str, Factory<T>)],
    id: &ComponentId,
    section: ComponentSection,
) -> Result<T> {
    match table.iter().find(|(kind, _)| *kind == id.kind()) {
        Some((_, factory)) => factory(id, section),
        None => {
            let known: Vec<&str> = table.iter().map(|(kind, _)| *kind).collect();
            bail!(
                "{role}.{id}: unknown {role} type {:?} (available: {})",
                id.kind(),
                if known.is_empty() {
                    "none yet".to_owned()
                } else {
                    known.join(", ")
                }
            )
        }
    }
}

pub fn build_receiver(id: &ComponentId, section: ComponentSection) -> Result<Box<dyn Receiver>> {
    build("receivers", RECEIVERS, id, section)
}

pub fn build_processor(id: &ComponentId, section: ComponentSection) -> Result<Box<dyn Processor>> {
    build("processors", PROCESSORS, id, section)
}

pub fn build_exporter(
    id: &ComponentId,
    section: ComponentSection,
) -> Result<Box<dyn MetricsExporter>> {
    build("exporters", EXPORTERS, id, section)
}
