//! The diff between the local folder, the journal and the remote listing,
//! before any file is read.
//!
//! - A file whose size, mtime and inode match its record, and whose remote
//!   etag is still the recorded one, is unchanged: it is not read again.
//! - A new path whose inode belongs to a record that vanished is a rename;
//!   when every file under a directory moved the same way, it is one
//!   directory rename.
//! - Everything else that exists locally is a candidate: it is hashed, then
//!   pushed, matched to a vanished record by content (a rename the inode did
//!   not reveal) or found identical.
//! - Records left vanished are deletions, decided after hashing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use crate::journal::{FileStamp, Record};

/// A file in the remote listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub size: u64,
    pub etag: String,
    pub mtime: Option<DateTime<Utc>>,
}

/// Whether the remote file `remote` at a record's path is still the version
/// the agent pushed there: only then may a local rename or delete of it be
/// passed on (a conflict's record names the other writer's version).
pub fn still_pushed(record: &Record, remote: Option<&RemoteFile>) -> bool {
    !record.diverged && remote.is_some_and(|r| r.etag == record.etag)
}

/// A server-side rename: one file, or a directory with everything under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: String,
    pub to: String,
    pub dir: bool,
}

/// A local file that has to be read before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: String,
    pub stamp: FileStamp,
    pub record: Option<Record>,
    pub remote: Option<RemoteFile>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub moves: Vec<Move>,
    /// Journal updates that go with `moves` (the records' new stamps).
    pub moved: Vec<Record>,
    pub candidates: Vec<Candidate>,
    pub vanished: Vec<Record>,
    pub unchanged: usize,
    /// Unchanged locally, but changed on the remote by someone else.
    pub changed_elsewhere: Vec<String>,
}

/// `scopes` are the roots this diff covers (`""`: everything); `local`,
/// `records` and `remote` hold what lies under them. `kept(path)` says a
/// record missing locally is not a deletion (ignored, unreadable, or still
/// being worked on). `busy(path)` says a local path is still being pushed
/// by earlier work: it is not renamed onto (see below).
pub fn plan(
    scopes: &[String],
    local: &BTreeMap<String, FileStamp>,
    records: &BTreeMap<String, Record>,
    remote: &BTreeMap<String, RemoteFile>,
    kept: &dyn Fn(&str) -> bool,
    busy: &dyn Fn(&str) -> bool,
) -> Plan {
    let mut plan = Plan::default();
    let mut gone: BTreeMap<&str, &Record> = records
        .iter()
        .filter(|(path, _)| !local.contains_key(*path) && !kept(path))
        .map(|(path, record)| (path.as_str(), record))
        .collect();
    let by_inode: HashMap<u64, &str> = gone
        .iter()
        .map(|(path, record)| (record.stamp.inode, *path))
        .collect();
    let mut file_moves = Vec::new();

    for (path, stamp) in local {
        let remote_now = remote.get(path);
        if let Some(record) = records.get(path) {
            match remote_now {
                _ if record.stamp != *stamp => {}
                Some(r) if r.etag == record.etag => {
                    plan.unchanged += 1;
                    continue;
                }
                Some(_) => {
                    plan.unchanged += 1;
                    plan.changed_elsewhere.push(path.clone());
                    continue;
                }
                // Replaced by a directory elsewhere (its conflict copy was made).
                None if remote.keys().any(|k| strictly_under(k, path)) => {
                    plan.unchanged += 1;
                    plan.changed_elsewhere.push(path.clone());
                    continue;
                }
                // Deleted elsewhere: pushed again.
                None => {}
            }
            plan.candidates.push(Candidate {
                path: path.clone(),
                stamp: *stamp,
                record: Some(record.clone()),
                remote: remote_now.cloned(),
            });
            continue;
        }
        // Not onto a path still being pushed: an earlier pass that saw the
        // new name before the old one went (its events came later) may be
        // uploading it as a new file, on condition that the server has no
        // file there. A rename would put one there, and the upload would
        // take the agent's own rename for someone else's file: a conflict
        // copy, and the name left to "the other writer". The old name is
        // deleted as any vanished file is; the path is looked at again once
        // that work ends, and pushed again if it holds something else now.
        let renamed_from = by_inode
            .get(&stamp.inode)
            .filter(|from| gone.contains_key(**from))
            .map(|from| records[*from].clone())
            .filter(|from| remote_now.is_none() && still_pushed(from, remote.get(&from.path)))
            .filter(|_| !busy(path));
        match renamed_from {
            Some(from) => {
                gone.remove(from.path.as_str());
                file_moves.push(Move {
                    from: from.path.clone(),
                    to: path.clone(),
                    dir: false,
                });
                let moved = Record {
                    path: path.clone(),
                    ..from
                };
                if moved.stamp == *stamp {
                    plan.moved.push(moved);
                } else {
                    // Renamed and changed: renamed first, then pushed over.
                    plan.candidates.push(Candidate {
                        path: path.clone(),
                        stamp: *stamp,
                        record: Some(moved.clone()),
                        remote: Some(RemoteFile {
                            size: moved.stamp.size,
                            etag: moved.etag.clone(),
                            mtime: None,
                        }),
                    });
                    plan.moved.push(moved);
                }
            }
            None => plan.candidates.push(Candidate {
                path: path.clone(),
                stamp: *stamp,
                record: None,
                remote: remote_now.cloned(),
            }),
        }
    }
    plan.vanished = gone.into_values().cloned().collect();
    plan.moves = group_directory_moves(scopes, file_moves, records, remote);
    plan
}

/// Replaces file moves by directory moves where a whole directory moved:
/// every record under it goes to the same place under the new name, the new
/// name is free on the remote, and the remote holds nothing under the old
/// name that the journal does not know (nothing unknown is carried along).
pub fn group_directory_moves(
    scopes: &[String],
    moves: Vec<Move>,
    records: &BTreeMap<String, Record>,
    remote: &BTreeMap<String, RemoteFile>,
) -> Vec<Move> {
    let targets: HashMap<&str, &str> = moves
        .iter()
        .map(|m| (m.from.as_str(), m.to.as_str()))
        .collect();
    let mut pairs: BTreeSet<(usize, String, String)> = BTreeSet::new();
    for m in &moves {
        let from: Vec<&str> = m.from.split('/').collect();
        let to: Vec<&str> = m.to.split('/').collect();
        let mut k = 1;
        while k < from.len() && k < to.len() && from[from.len() - k] == to[to.len() - k] {
            let a = from[..from.len() - k].join("/");
            let b = to[..to.len() - k].join("/");
            if a != b {
                pairs.insert((from.len() - k, a, b));
            }
            k += 1;
        }
    }
    let within = |p: &str| scopes.iter().any(|s| s.is_empty() || under(p, s));
    let mut chosen: Vec<Move> = Vec::new();
    let mut consumed: BTreeSet<&str> = BTreeSet::new();
    for (_, a, b) in &pairs {
        if !within(a) || !within(b) || under(b, a) || under(a, b) {
            continue;
        }
        if chosen
            .iter()
            .any(|c| under(a, &c.from) || under(&c.from, a) || under(b, &c.to) || under(&c.to, b))
        {
            continue;
        }
        let inside: Vec<&String> = records.keys().filter(|p| strictly_under(p, a)).collect();
        let all_moved = !inside.is_empty()
            && inside.iter().all(|p| {
                targets.get(p.as_str()).copied() == Some(format!("{b}{}", &p[a.len()..]).as_str())
            });
        let target_free = !remote.keys().any(|p| under(p, b));
        let nothing_unknown = remote
            .keys()
            .filter(|p| strictly_under(p, a))
            .all(|p| records.contains_key(p));
        if all_moved && target_free && nothing_unknown {
            consumed.extend(inside.iter().map(|p| p.as_str()));
            chosen.push(Move {
                from: a.clone(),
                to: b.clone(),
                dir: true,
            });
        }
    }
    chosen.extend(
        moves
            .into_iter()
            .filter(|m| !consumed.contains(m.from.as_str())),
    );
    chosen
}

/// `path` is `dir` or lies below it.
pub fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || strictly_under(path, dir)
}

/// `path` lies below `dir`.
pub fn strictly_under(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(inode: u64, size: u64) -> FileStamp {
        FileStamp {
            size,
            mtime_ns: 1_000 + inode as i64,
            inode,
        }
    }

    fn record(path: &str, inode: u64) -> Record {
        Record {
            path: path.into(),
            stamp: stamp(inode, 10),
            sha256: format!("h{inode}"),
            etag: format!("e{inode}"),
            diverged: false,
        }
    }

    fn remote_of(records: &[Record]) -> BTreeMap<String, RemoteFile> {
        records
            .iter()
            .map(|r| {
                (
                    r.path.clone(),
                    RemoteFile {
                        size: r.stamp.size,
                        etag: r.etag.clone(),
                        mtime: None,
                    },
                )
            })
            .collect()
    }

    fn index(records: &[Record]) -> BTreeMap<String, Record> {
        records
            .iter()
            .map(|r| (r.path.clone(), r.clone()))
            .collect()
    }

    fn everything() -> Vec<String> {
        vec![String::new()]
    }

    #[test]
    fn unchanged_files_are_not_candidates() {
        let recs = [record("a", 1), record("d/b", 2)];
        let local = recs.iter().map(|r| (r.path.clone(), r.stamp)).collect();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert_eq!(p.unchanged, 2);
        assert!(p.candidates.is_empty() && p.moves.is_empty() && p.vanished.is_empty());
    }

    #[test]
    fn changed_new_and_remotely_deleted_files_are_candidates() {
        let recs = [record("a", 1), record("b", 2)];
        let mut local: BTreeMap<String, FileStamp> =
            recs.iter().map(|r| (r.path.clone(), r.stamp)).collect();
        local.get_mut("a").unwrap().size = 11;
        local.insert("c".into(), stamp(3, 5));
        let mut remote = remote_of(&recs);
        remote.remove("b");
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote,
            &|_| false,
            &|_| false,
        );
        let paths: Vec<&str> = p.candidates.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["a", "b", "c"]);
        assert!(p.candidates[2].record.is_none());
    }

    #[test]
    fn a_remote_change_to_an_unchanged_file_is_left_alone() {
        let recs = [record("a", 1)];
        let local = recs.iter().map(|r| (r.path.clone(), r.stamp)).collect();
        let mut remote = remote_of(&recs);
        remote.get_mut("a").unwrap().etag = "other".into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote,
            &|_| false,
            &|_| false,
        );
        assert_eq!(p.changed_elsewhere, ["a"]);
        assert!(p.candidates.is_empty());
    }

    #[test]
    fn a_file_replaced_by_a_directory_elsewhere_is_left_alone() {
        let recs = [record("a", 1)];
        let local = recs.iter().map(|r| (r.path.clone(), r.stamp)).collect();
        let remote: BTreeMap<String, RemoteFile> = [(
            "a/inner".to_string(),
            RemoteFile {
                size: 1,
                etag: "x".into(),
                mtime: None,
            },
        )]
        .into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote,
            &|_| false,
            &|_| false,
        );
        assert_eq!(p.changed_elsewhere, ["a"]);
        assert!(p.candidates.is_empty());
    }

    #[test]
    fn a_renamed_file_is_found_by_inode() {
        let recs = [record("old", 1)];
        let local = [("new".to_string(), recs[0].stamp)].into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert_eq!(
            p.moves,
            [Move {
                from: "old".into(),
                to: "new".into(),
                dir: false
            }]
        );
        assert_eq!(p.moved[0].path, "new");
        assert!(p.vanished.is_empty() && p.candidates.is_empty());
    }

    #[test]
    fn a_path_still_being_pushed_is_not_renamed_onto() {
        // The new name was seen first, without the old one's record, and is
        // being uploaded as a new file: renaming onto it would make that
        // upload fail against the agent's own rename (a conflict copy).
        let recs = [record("old", 1)];
        let local = [("new".to_string(), recs[0].stamp)].into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|path| path == "new",
        );
        assert!(p.moves.is_empty() && p.moved.is_empty());
        let paths: Vec<&str> = p.candidates.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["new"]);
        assert!(p.candidates[0].record.is_none());
        assert_eq!(p.vanished, [recs[0].clone()]);
    }

    #[test]
    fn a_new_hard_link_is_a_new_file_not_a_rename() {
        let recs = [record("a", 1)];
        // `ln a b`: the same inode under a second name, the first one kept.
        let local = [
            ("a".to_string(), recs[0].stamp),
            ("b".to_string(), recs[0].stamp),
        ]
        .into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert!(p.moves.is_empty() && p.vanished.is_empty());
        assert_eq!(p.unchanged, 1);
        assert_eq!(p.candidates.len(), 1);
        assert_eq!(
            (p.candidates[0].path.as_str(), &p.candidates[0].record),
            ("b", &None)
        );

        // `ln a b; rm a`: a rename, as `mv a b` is.
        let local = [("b".to_string(), recs[0].stamp)].into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert_eq!(p.moves.len(), 1);
        assert!(p.vanished.is_empty() && p.candidates.is_empty());
    }

    #[test]
    fn removing_one_of_two_hard_links_deletes_only_it() {
        let recs = [record("a", 1), record("b", 1)];
        let local = [("a".to_string(), recs[0].stamp)].into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert_eq!(p.vanished, [recs[1].clone()]);
        assert_eq!(p.unchanged, 1);
        assert!(p.moves.is_empty() && p.candidates.is_empty());
    }

    #[test]
    fn a_renamed_and_edited_file_is_moved_then_a_candidate() {
        let recs = [record("old", 1)];
        let mut s = recs[0].stamp;
        s.size = 99;
        let local = [("new".to_string(), s)].into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.candidates[0].path, "new");
        assert_eq!(p.candidates[0].record.as_ref().unwrap().etag, "e1");
    }

    #[test]
    fn deleted_files_vanish_unless_kept() {
        let recs = [record("a", 1), record("ignored/b", 2)];
        let local = BTreeMap::new();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|p| p.starts_with("ignored/"),
            &|_| false,
        );
        assert_eq!(p.vanished, [recs[0].clone()]);
    }

    #[test]
    fn a_moved_directory_is_one_move() {
        let recs: Vec<Record> = (0..5)
            .map(|i| record(&format!("photos/2024/{i}.jpg"), i + 1))
            .chain([record("photos/other.jpg", 100)])
            .collect();
        let mut local: BTreeMap<String, FileStamp> = BTreeMap::new();
        for r in &recs {
            local.insert(r.path.replace("photos/2024/", "archive/2024/"), r.stamp);
        }
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert_eq!(
            p.moves,
            [Move {
                from: "photos/2024".into(),
                to: "archive/2024".into(),
                dir: true
            }],
            "photos/other.jpg stayed, so only 2024 moved as a directory"
        );
    }

    #[test]
    fn a_directory_move_is_not_used_when_part_stayed_or_unknown_files_are_there() {
        let recs: Vec<Record> = (0..3).map(|i| record(&format!("d/{i}"), i + 1)).collect();
        // d/2 was not moved.
        let local: BTreeMap<String, FileStamp> = [
            ("e/0".to_string(), recs[0].stamp),
            ("e/1".to_string(), recs[1].stamp),
            ("d/2".to_string(), recs[2].stamp),
        ]
        .into();
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote_of(&recs),
            &|_| false,
            &|_| false,
        );
        assert!(p.moves.iter().all(|m| !m.dir));
        assert_eq!(p.moves.len(), 2);

        // Everything moved, but the remote has a file under d/ that is not ours.
        let local: BTreeMap<String, FileStamp> = recs
            .iter()
            .map(|r| (r.path.replace("d/", "e/"), r.stamp))
            .collect();
        let mut remote = remote_of(&recs);
        remote.insert(
            "d/theirs".into(),
            RemoteFile {
                size: 1,
                etag: "x".into(),
                mtime: None,
            },
        );
        let p = plan(
            &everything(),
            &local,
            &index(&recs),
            &remote,
            &|_| false,
            &|_| false,
        );
        assert!(p.moves.iter().all(|m| !m.dir));
        assert_eq!(p.moves.len(), 3);
    }

    #[test]
    fn directory_moves_stay_inside_the_scopes() {
        let recs = [record("x/a/f", 1), record("x/keep", 2)];
        let local: BTreeMap<String, FileStamp> = [("y/a/f".to_string(), recs[0].stamp)].into();
        let only = [recs[0].clone()];
        let p = plan(
            &["x/a".to_string(), "y/a".to_string()],
            &local,
            &index(&only),
            &remote_of(&only),
            &|_| false,
            &|_| false,
        );
        assert_eq!(
            p.moves,
            [Move {
                from: "x/a".into(),
                to: "y/a".into(),
                dir: true
            }]
        );
    }

    #[test]
    fn under_respects_segment_boundaries() {
        assert!(under("a/b", "a"));
        assert!(under("a", "a"));
        assert!(!under("ab", "a"));
        assert!(under("anything", ""));
    }
}
