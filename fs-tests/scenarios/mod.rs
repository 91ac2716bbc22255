//! The hand-written scenarios, one module per group of behaviour.

use crate::scenario::Scenario;

mod acl;
mod copyup;
mod errors;
mod io;
mod links;
mod lookup;
mod metadata;
mod mount;
mod opaque;
mod rename;
mod rmdir;
mod setid;
mod special;
mod whiteout;
mod xattr;

/// Every group with its scenarios; trial names are `group::scenario`.
pub fn all() -> Vec<(&'static str, Vec<Scenario>)> {
    vec![
        ("lookup", lookup::scenarios()),
        ("whiteout", whiteout::scenarios()),
        ("opaque", opaque::scenarios()),
        ("copyup", copyup::scenarios()),
        ("metadata", metadata::scenarios()),
        ("rename", rename::scenarios()),
        ("rmdir", rmdir::scenarios()),
        ("hardlink", links::hardlinks()),
        ("symlink", links::symlinks()),
        ("special", special::scenarios()),
        ("xattr", xattr::scenarios()),
        ("setid", setid::scenarios()),
        ("acl", acl::scenarios()),
        ("io", io::scenarios()),
        ("errors", errors::scenarios()),
        ("mount", mount::scenarios()),
    ]
}
