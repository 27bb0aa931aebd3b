//! In-process platform (being written).
