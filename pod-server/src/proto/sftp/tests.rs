//! Round trips of every packet and extension, hostile input, and OpenSSH's own bytes.

use super::*;
use crate::proto::wire::take_frame;

fn b(s: &[u8]) -> Bytes {
    Bytes::copy_from_slice(s)
}

fn frame_of(encode: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::new();
    encode(&mut buf);
    let frame = take_frame(&mut buf, MAX_PACKET).expect("valid frame").expect("a whole frame");
    assert!(buf.is_empty(), "encode wrote more than one frame");
    frame
}

/// Every strict prefix of a frame fails to decode, and so does the frame plus a byte.
fn check_hostile<T: std::fmt::Debug>(frame: &Bytes, decode: impl Fn(Bytes) -> Result<T, DecodeError>) {
    for len in 0..frame.len() {
        assert!(decode(frame.slice(..len)).is_err(), "prefix of {len} bytes decoded");
    }
    let mut longer = BytesMut::from(frame.as_ref());
    longer.put_u8(0);
    assert_eq!(decode(longer.freeze()).unwrap_err(), DecodeError::Trailing(1));
}

fn check_request(body: RequestBody) {
    let req = Request { id: 0xdead_beef, body };
    let frame = frame_of(|buf| req.encode(buf));
    assert_eq!(Request::decode(frame.clone()).unwrap(), req);
    assert_eq!(peek_id(&frame), Some(req.id));
    if !matches!(req.body, RequestBody::Extended { .. }) {
        check_hostile(&frame, Request::decode);
    }
}

fn check_response(body: ResponseBody, kind: ReplyKind) {
    let resp = Response { id: 7, body };
    let frame = frame_of(|buf| resp.encode(buf));
    assert_eq!(
        Response::decode(frame.clone(), |id| {
            assert_eq!(id, 7);
            kind
        })
        .unwrap(),
        resp
    );
    if kind != ReplyKind::Raw {
        check_hostile(&frame, |f| Response::decode(f, |_| kind));
    }
}

fn ts(sec: i64, nsec: u32) -> Timespec {
    Timespec { sec, nsec }
}

fn full_stat() -> FullStat {
    FullStat {
        dev: 0x803,
        ino: 1 << 40,
        mode: 0o100640,
        nlink: 3,
        uid: 1000,
        gid: 100,
        rdev: 0,
        size: 12345,
        blocks: 24,
        blksize: 4096,
        atime: ts(-1, 5),
        mtime: ts(5_000_000_000, 999_999_999),
        ctime: ts(1_700_000_000, 0),
    }
}

fn all_attrs() -> Attrs {
    Attrs {
        size: Some(u64::MAX),
        uid_gid: Some((0, u32::MAX)),
        permissions: Some(0o40755),
        atime_mtime: Some((1, u32::MAX)),
        extended: vec![(b(b"a@x"), b(b"\xff\x00")), (b(b""), b(b""))],
    }
}

fn condition() -> Condition {
    Condition { size: 9, mtime: ts(1_700_000_000, 123), ino: 77 }
}

#[test]
fn every_request_round_trips() {
    use RequestBody::*;
    let h = || b(b"\x00\xffhandle");
    let p = || b(b"/root/dir/\xff\xfename");
    let samples = vec![
        Open {
            filename: p(),
            pflags: open_flags::WRITE | open_flags::CREAT | open_flags::EXCL,
            attrs: all_attrs(),
        },
        Open { filename: p(), pflags: open_flags::READ, attrs: Attrs::default() },
        Close { handle: h() },
        Read { handle: h(), offset: u64::MAX, len: MAX_DATA },
        Write { handle: h(), offset: 4096, data: b(b"some \xff data") },
        Lstat { path: p() },
        Fstat { handle: h() },
        Setstat { path: p(), attrs: Attrs { permissions: Some(0o600), ..Attrs::default() } },
        Fsetstat { handle: h(), attrs: Attrs { size: Some(0), ..Attrs::default() } },
        Opendir { path: p() },
        Readdir { handle: h() },
        Remove { filename: p() },
        Mkdir { path: p(), attrs: Attrs { permissions: Some(0o700), ..Attrs::default() } },
        Rmdir { path: p() },
        Realpath { path: b(b".") },
        Stat { path: p() },
        Rename { oldpath: p(), newpath: b(b"/new") },
        Readlink { path: p() },
        Symlink { linkpath: p(), target: b(b"../target") },
        PosixRename { oldpath: p(), newpath: b(b"/new") },
        Statvfs { path: p() },
        Fstatvfs { handle: h() },
        Fsync { handle: h() },
        Hardlink { oldpath: p(), newpath: b(b"/link") },
        Limits,
        Lsetstat { path: p(), attrs: all_attrs() },
        ExpandPath { path: b(b"~/x") },
        DevStat { path: p(), follow: true },
        DevStat { path: p(), follow: false },
        DevFstat { handle: h() },
        DevSetstat { path: p(), follow: false, attrs: SetAttrs::default() },
        DevSetstat {
            path: p(),
            follow: true,
            attrs: SetAttrs {
                mode: Some(0o4755),
                uid: Some(1),
                gid: Some(2),
                size: Some(3),
                atime: TimeSet::Now,
                mtime: TimeSet::At(ts(-100, 999_999_999)),
            },
        },
        DevRename { oldpath: p(), newpath: b(b"/b"), flags: 0, condition: None },
        DevRename {
            oldpath: p(),
            newpath: b(b"/b"),
            flags: rename_flags::NOREPLACE,
            condition: Some(condition()),
        },
        DevRename { oldpath: p(), newpath: b(b"/b"), flags: rename_flags::EXCHANGE, condition: None },
        DevMknod { path: p(), mode: libc::S_IFIFO | 0o644, rdev: 0 },
        DevWalk { path: p(), max_entries: 4096, max_depth: 0 },
        DevWalk { path: p(), max_entries: 0, max_depth: 1 },
        DevWalkRead { handle: h() },
        DevList { path: p(), max_entries: 0 },
        DevList { path: b(b"."), max_entries: u32::MAX },
        DevGet { path: p(), max_size: 65536 },
        DevPut(Put {
            path: p(),
            excl: false,
            fsync: false,
            mode: 0o644,
            atime: None,
            mtime: None,
            condition: None,
            data: Bytes::new(),
        }),
        DevPut(Put {
            path: p(),
            excl: true,
            fsync: true,
            mode: 0o600,
            atime: Some(ts(1, 2)),
            mtime: Some(ts(3, 4)),
            condition: Some(condition()),
            data: b(b"contents\xff"),
        }),
        DevWrite { handle: h(), offset: 10, condition: condition(), data: b(b"abc") },
        DevBarrier,
        Extended { name: b(b"copy-data"), data: b(b"\x00\x00\x00\x01h") },
        Extended { name: b(b"\xff@nowhere"), data: Bytes::new() },
    ];
    for body in samples {
        check_request(body);
    }
}

#[test]
fn every_response_round_trips() {
    use ResponseBody as R;
    let samples = vec![
        (R::Status(Status::ok()), ReplyKind::Raw),
        (R::Status(Status::new(StatusCode::CHANGED, "changed")), ReplyKind::SeqStat),
        (
            R::Status(Status { code: StatusCode(999), message: b(b"\xff"), language: b(b"en") }),
            ReplyKind::Raw,
        ),
        (R::Handle(b(b"\x00\x01\xff")), ReplyKind::Raw),
        (R::Data(b(b"")), ReplyKind::Raw),
        (R::Data(Bytes::from(vec![0xa5; 70_000])), ReplyKind::Raw),
        (R::Name(vec![]), ReplyKind::Raw),
        (
            R::Name(vec![
                NameEntry {
                    filename: b(b"\xffname"),
                    longname: b(b"-rw-r--r-- 1 u g 0 Jan 1 1970 x"),
                    attrs: all_attrs(),
                },
                NameEntry { filename: b(b"."), longname: Bytes::new(), attrs: Attrs::default() },
            ]),
            ReplyKind::Raw,
        ),
        (R::Attrs(all_attrs()), ReplyKind::Raw),
        (R::Attrs(Attrs::from_stat(&full_stat())), ReplyKind::Raw),
        (R::ExtendedReply(b(b"\x01\x02")), ReplyKind::Raw),
        (
            R::StatVfs(StatVfs {
                bsize: 4096,
                frsize: 4096,
                blocks: 1,
                bfree: 2,
                bavail: 3,
                files: 4,
                ffree: 5,
                favail: 6,
                fsid: 7,
                flag: StatVfs::RDONLY | StatVfs::NOSUID,
                namemax: 255,
            }),
            ReplyKind::StatVfs,
        ),
        (R::Limits(Limits::DEVMOUNT), ReplyKind::Limits),
        (R::SeqStat(SeqStat { seq: 42, stat: full_stat() }), ReplyKind::SeqStat),
        (R::Walk(WalkBatch { seq: 1, eof: false, entries: vec![] }), ReplyKind::Walk),
        (
            R::Walk(WalkBatch {
                seq: u64::MAX,
                eof: true,
                entries: vec![
                    WalkEntry { path: Bytes::new(), stat: full_stat(), target: Bytes::new() },
                    WalkEntry { path: b(b"a/\xff"), stat: full_stat(), target: b(b"/abs/target") },
                ],
            }),
            ReplyKind::Walk,
        ),
        (R::List(ListReply { seq: 0, stat: full_stat(), complete: true, entries: vec![] }), ReplyKind::List),
        (
            R::List(ListReply {
                seq: 12,
                stat: FullStat { mode: 0o40755, ..full_stat() },
                complete: false,
                entries: vec![
                    WalkEntry { path: b(b"f\xfe"), stat: full_stat(), target: Bytes::new() },
                    WalkEntry { path: b(b"l"), stat: full_stat(), target: b(b"../t") },
                ],
            }),
            ReplyKind::List,
        ),
        (R::Get(GetReply { seq: 3, stat: full_stat(), data: b(b"file\xff") }), ReplyKind::Get),
        (R::Barrier(0), ReplyKind::Barrier),
        (R::Barrier(u64::MAX), ReplyKind::Barrier),
    ];
    for (body, kind) in samples {
        check_response(body, kind);
    }
}

/// A DATA reply built in place, as the server serves a READ, is the DATA reply the codec encodes.
#[test]
fn data_built_in_place_is_a_data_reply() {
    for payload in [&b""[..], b"x", &[0xa5; 70_000]] {
        let mut buf = BytesMut::from(&b"before"[..]);
        let start = Response::begin_data(&mut buf, 9);
        assert_eq!(buf.len() - start, Response::DATA_HEADER_LEN);
        buf.put_slice(payload);
        Response::end_data(&mut buf, start);
        let mut want = BytesMut::from(&b"before"[..]);
        Response { id: 9, body: ResponseBody::Data(b(payload)) }.encode(&mut want);
        assert_eq!(buf, want);
    }
}

#[test]
fn hello_round_trips_and_lists_every_extension() {
    let init = Init { version: 3, extensions: vec![(b(b"x@y"), b(b"1"))] };
    assert_eq!(Init::decode(frame_of(|buf| init.encode(buf))).unwrap(), init);
    let version = Version::devmount();
    assert_eq!(Version::decode(frame_of(|buf| version.encode(buf))).unwrap(), version);
    assert_eq!(version.extension(ext::VERSION).unwrap().as_ref(), crate::proto::SERVER_VERSION.as_bytes());
    for name in ext::DEVMOUNT {
        assert_eq!(version.extension(name).unwrap().as_ref(), b"1", "{name}");
    }
    for (name, value) in ext::OPENSSH {
        assert_eq!(version.extension(name).unwrap().as_ref(), value.as_bytes(), "{name}");
    }
    assert!(version.extension("copy-data").is_none());
}

/// The bytes OpenSSH's `sftp` and `sftp-server` (9.x) exchange first, written out from the
/// spec rather than produced by this codec.
#[test]
fn openssh_hello_bytes_decode() {
    let mut stream = BytesMut::from(&b"\x00\x00\x00\x05\x01\x00\x00\x00\x03"[..]);
    let init = take_frame(&mut stream, MAX_PACKET).unwrap().unwrap();
    assert_eq!(Init::decode(init).unwrap(), Init { version: 3, extensions: vec![] });

    let pairs: &[(&[u8], &[u8])] = &[
        (b"posix-rename@openssh.com", b"1"),
        (b"statvfs@openssh.com", b"2"),
        (b"fstatvfs@openssh.com", b"2"),
        (b"hardlink@openssh.com", b"1"),
        (b"fsync@openssh.com", b"1"),
        (b"lsetstat@openssh.com", b"1"),
        (b"limits@openssh.com", b"1"),
        (b"expand-path@openssh.com", b"1"),
        (b"copy-data", b"1"),
        (b"home-directory", b"1"),
        (b"users-groups-by-id@openssh.com", b"1"),
    ];
    let mut body = vec![2u8, 0, 0, 0, 3];
    for (name, value) in pairs {
        for s in [name, value] {
            body.extend_from_slice(&(s.len() as u32).to_be_bytes());
            body.extend_from_slice(s);
        }
    }
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&body);
    let frame = take_frame(&mut BytesMut::from(&wire[..]), MAX_PACKET).unwrap().unwrap();
    let version = Version::decode(frame).unwrap();
    assert_eq!(version.version, 3);
    assert_eq!(version.extensions.len(), pairs.len());
    assert_eq!(version.extension(ext::STATVFS).unwrap().as_ref(), b"2");
    assert!(version.extension(ext::VERSION).is_none());
    let mut again = BytesMut::new();
    version.encode(&mut again);
    assert_eq!(again.as_ref(), &wire[..]);
}

#[test]
fn symlink_sends_the_target_first_as_openssh_does() {
    let req = Request { id: 1, body: RequestBody::Symlink { linkpath: b(b"LINK"), target: b(b"TARGET") } };
    let frame = frame_of(|buf| req.encode(buf));
    assert_eq!(&frame[..], b"\x14\x00\x00\x00\x01\x00\x00\x00\x06TARGET\x00\x00\x00\x04LINK");
}

#[test]
fn attrs_layout_is_the_drafts() {
    let resp = Response {
        id: 2,
        body: ResponseBody::Attrs(Attrs {
            size: Some(1),
            uid_gid: None,
            permissions: Some(0o644),
            atime_mtime: None,
            extended: vec![],
        }),
    };
    let frame = frame_of(|buf| resp.encode(buf));
    assert_eq!(
        &frame[..],
        b"\x69\x00\x00\x00\x02\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x01\xa4"
    );
}

#[test]
fn hostile_lengths_are_refused() {
    let mut oversized = BytesMut::new();
    oversized.put_u32(MAX_PACKET as u32 + 1);
    assert_eq!(
        take_frame(&mut oversized, MAX_PACKET),
        Err(DecodeError::TooLarge { len: MAX_PACKET + 1, max: MAX_PACKET })
    );

    // LSTAT whose path claims 4 GiB.
    let truncated = b(b"\x07\x00\x00\x00\x01\xff\xff\xff\xff/etc");
    assert!(matches!(Request::decode(truncated), Err(DecodeError::Truncated { .. })));

    // NAME, ATTRS extended pairs and walk batches claiming u32::MAX entries.
    let names = b(b"\x68\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00\x00\x00");
    assert!(matches!(Response::decode(names, |_| ReplyKind::Raw), Err(DecodeError::Truncated { .. })));
    let attrs = b(b"\x69\x00\x00\x00\x01\x80\x00\x00\x00\xff\xff\xff\xff");
    assert!(matches!(Response::decode(attrs, |_| ReplyKind::Raw), Err(DecodeError::Truncated { .. })));
    let walk = b(b"\xc9\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff");
    assert!(matches!(Response::decode(walk, |_| ReplyKind::Walk), Err(DecodeError::Truncated { .. })));
    let mut list = BytesMut::from(&b"\xc9\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00"[..]);
    full_stat().encode(&mut list);
    list.put_slice(b"\x00\xff\xff\xff\xff");
    assert!(matches!(
        Response::decode(list.freeze(), |_| ReplyKind::List),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn malformed_packets_are_refused() {
    let check = |frame: &[u8], want: DecodeError| {
        assert_eq!(Request::decode(b(frame)).unwrap_err(), want, "{frame:?}");
    };
    check(b"\x01\x00\x00\x00\x03", DecodeError::UnknownType(1));
    check(b"\x15\x00\x00\x00\x01", DecodeError::UnknownType(21));
    check(b"\x65\x00\x00\x00\x01", DecodeError::UnknownType(101));
    check(b"", DecodeError::Truncated { offset: 0, needed: 1 });
    check(
        b"\x09\x00\x00\x00\x01\x00\x00\x00\x01/\x00\x00\x00\x10",
        DecodeError::Invalid("unknown attribute flags"),
    );

    let ext = |name: &str, rest: &[u8]| {
        let mut f = BytesMut::from(&b"\xc8\x00\x00\x00\x01"[..]);
        f.put_string(name.as_bytes());
        f.put_slice(rest);
        Request::decode(f.freeze()).unwrap_err()
    };
    assert_eq!(
        ext(ext::STAT, b"\x00\x00\x00\x01/\x00\x00\x00\x02"),
        DecodeError::Invalid("unknown stat flags")
    );
    assert_eq!(
        ext(ext::RENAME, b"\x00\x00\x00\x01a\x00\x00\x00\x01b\x00\x00\x00\x04\x00"),
        DecodeError::Invalid("unknown rename flags")
    );
    assert_eq!(
        ext(ext::RENAME, b"\x00\x00\x00\x01a\x00\x00\x00\x01b\x00\x00\x00\x00\x02"),
        DecodeError::Invalid("optional tag is neither 0 nor 1")
    );
    assert_eq!(
        ext(ext::SETSTAT, b"\x00\x00\x00\x01/\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00"),
        DecodeError::Invalid("unknown time tag")
    );
    let mut bad_nsec = BytesMut::from(&b"\x00\x00\x00\x01/\x00\x00\x00\x00\x00\x00\x00\x00\x02"[..]);
    bad_nsec.put_i64(0);
    bad_nsec.put_u32(1_000_000_000);
    bad_nsec.put_u8(0);
    assert_eq!(ext(ext::SETSTAT, &bad_nsec), DecodeError::Invalid("nanoseconds out of range"));
    assert_eq!(
        ext(ext::PUT, b"\x00\x00\x00\x01/\x00\x00\x00\x04"),
        DecodeError::Invalid("unknown put flags")
    );

    assert_eq!(
        Response::decode(b(b"\x03\x00\x00\x00\x01"), |_| ReplyKind::Raw).unwrap_err(),
        DecodeError::UnknownType(3)
    );
    assert_eq!(Version::decode(b(b"\x01\x00\x00\x00\x03")).unwrap_err(), DecodeError::UnknownType(1));
}

#[test]
fn peek_id_only_where_there_is_one() {
    assert_eq!(peek_id(b"\x01\x00\x00\x00\x03"), None);
    assert_eq!(peek_id(b"\x02\x00\x00\x00\x03"), None);
    assert_eq!(peek_id(b"\x07\x00\x00\x01"), None);
    assert_eq!(peek_id(b"\xfe\x00\x00\x01\x02"), Some(0x102));
}

#[test]
fn io_errors_map_to_status_and_back() {
    let check = |errno: i32, code: StatusCode, message: &str| {
        let (got_code, got_message) = status_from_io(&io::Error::from_raw_os_error(errno));
        assert_eq!((got_code, got_message.as_str()), (code, message), "errno {errno}");
        assert_eq!(errno_from_status(code, message.as_bytes()), errno, "{message}");
    };
    check(libc::ENOENT, StatusCode::NO_SUCH_FILE, "No such file or directory");
    check(libc::ENOTDIR, StatusCode::NO_SUCH_FILE, "Not a directory");
    check(libc::EACCES, StatusCode::PERMISSION_DENIED, "Permission denied");
    check(libc::EPERM, StatusCode::PERMISSION_DENIED, "Operation not permitted");
    check(libc::EEXIST, StatusCode::FAILURE, "File exists");
    check(libc::ENOTEMPTY, StatusCode::FAILURE, "Directory not empty");
    check(libc::ENOSPC, StatusCode::FAILURE, "No space left on device");
    check(libc::EXDEV, StatusCode::FAILURE, "Cross-device link");
    check(libc::ENOSYS, StatusCode::OP_UNSUPPORTED, "Function not implemented");

    let unsupported = io::Error::new(io::ErrorKind::Unsupported, "no");
    assert_eq!(status_from_io(&unsupported).0, StatusCode::OP_UNSUPPORTED);
    assert_eq!(status_from_io(&io::Error::other("weird")), (StatusCode::FAILURE, "weird".to_owned()));

    // A message that names no errno, or one sent with another code, falls back to the code.
    assert_eq!(errno_from_status(StatusCode::FAILURE, b"Failure"), libc::EIO);
    assert_eq!(errno_from_status(StatusCode::NO_SUCH_FILE, b"File exists"), libc::ENOENT);
    assert_eq!(errno_from_status(StatusCode::CHANGED, b""), libc::ESTALE);
    assert_eq!(errno_from_status(StatusCode::OK, b"Success"), 0);
}

#[test]
fn v3_times_clamp() {
    let mut st = full_stat();
    let attrs = Attrs::from_stat(&st);
    assert_eq!(attrs.atime_mtime, Some((0, u32::MAX)));
    st.atime = ts(7, 0);
    st.mtime = ts(8, 1);
    assert_eq!(Attrs::from_stat(&st).atime_mtime, Some((7, 8)));
    assert!(Condition::of(&st).matches(&st));
    let mut changed = st;
    changed.mtime.nsec += 1;
    assert!(!Condition::of(&st).matches(&changed));
}
