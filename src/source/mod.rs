//! Record sources beyond files and stdin (which `app` reads directly).

pub mod kafka;
