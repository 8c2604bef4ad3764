//! The segment language: syntax tree, parser and type checker.
//!
//! `parse::parse_segments` turns a segment file into a checked [`ast::SegmentFile`] or a
//! [`parse::SegmentError`] with line, column and a plain message. Nothing of a bad file
//! is returned.

pub mod ast;
mod display;
mod lower;
pub mod parse;
