"""The classes the seed corpus covers, the mapper's rules and list-rewrite recovery."""

from __future__ import annotations

from collections.abc import Iterator

from tests.corpus.mailbuild import (
    ALICE,
    ME,
    PNG,
    Att,
    Case,
    att_part,
    b64,
    crlf,
    ew,
    head,
    leaf,
    multipart,
    pdf,
    qp,
    simple,
)

PLAIN_CHARSETS = [
    ("utf-8", "utf-8", "Grüße — the VPN drops every hour ✓"),
    ("iso-8859-1", "latin-1", "Café au lait, s'il vous plaît"),
    ("iso-8859-15", "iso8859_15", "Prix: 5 € TTC"),
    ("windows-1250", "cp1250", "Dobrý den, tiskárna nefunguje"),
    ("koi8-u", "koi8_u", "Добрий вечір"),
    ("shift_jis", "cp932", "プリンターが壊れました"),
    ("euc-jp", "euc_jp", "請求書を送ってください"),
    ("iso-8859-7", "iso8859_7", "Ο εκτυπωτής δεν δουλεύει"),  # noqa: RUF001
    ("iso-8859-9", "iso8859_9", "Yazıcı çalışmıyor"),  # noqa: RUF001
    ("us-ascii", "ascii", "Plain ASCII only here"),
]


def plain() -> Iterator[Case]:
    """text/plain in common charsets under each transfer encoding."""
    for label, codec, sample in PLAIN_CHARSETS:
        data = f"{sample}\n\nRegards,\nAlice\n".encode(codec).replace(b"\n", b"\r\n")
        for cte in ("8bit", "base64", "quoted-printable"):
            slug = f"plain-{label}-{cte}".replace("_", "-")
            if cte == "8bit":
                body = data
            elif cte == "base64":
                body = crlf(b64(data)) + b"\r\n"
            else:
                body = crlf(qp(data)) + b"\r\n"
            yield simple(
                slug,
                "class-plain",
                ew(sample, "utf-8"),
                sample,
                body,
                text=sample,
                ctype=f"text/plain; charset={label}",
                cte=cte,
            )
    flowed = "A long line that was\r\nwrapped by format=flowed.\r\n"
    yield simple(
        "plain-lf-only",
        "class-plain",
        "LF only",
        "LF only",
        b"line one\nline two\n",
        text="line one\nline two",
    )
    yield simple(
        "plain-flowed",
        "class-plain",
        "flowed",
        "flowed",
        flowed.encode(),
        text="wrapped by format=flowed",
        ctype="text/plain; charset=utf-8; format=flowed",
    )
    yield simple(
        "plain-no-content-type",
        "class-plain",
        "no type",
        "no type",
        b"Just text.\r\n",
        text="Just text.",
        ctype="text/plain",
    )


def alternative() -> Iterator[Case]:
    for n, (text, html) in enumerate(
        [
            ("The VPN drops every hour.", "<p>The VPN drops <b>every hour</b>.</p>"),
            ("Ünïcödé text", "<p>Ünïcödé <i>html</i></p>"),
            (
                "Meeting at 10:00",
                "<html><head><style>p{}</style></head><body><p>Meeting at 10:00</p></body></html>",
            ),
            ("Line 1\nLine 2", "<div>Line 1<br>Line 2</div>"),
            ("Price: 5 €", "<p>Price: 5 &euro;</p>"),
        ]
    ):
        slug = f"alternative-{n}"
        cte = ("8bit", "quoted-printable", "base64")[n % 3]
        parts = []
        for ctype, content in (
            ("text/plain; charset=utf-8", text),
            ("text/html; charset=utf-8", html),
        ):
            data = content.encode().replace(b"\n", b"\r\n")
            encoded = {"8bit": content, "quoted-printable": qp(data), "base64": b64(data)}[cte]
            parts.append(leaf(ctype, encoded, cte=cte))
        raw = crlf(
            head(f"alt {n}").replace("{slug}", slug) + multipart("alternative", f"alt{n}", parts)
        )
        yield Case(
            slug,
            "class-alternative",
            raw,
            f"alt {n}",
            ALICE,
            [ME],
            text=text.split("\n")[0],
            html=html[-20:],
            message_ids=[f"<{slug}@example.com>"],
        )
    html_only = (
        "<html><body><h1>Hello</h1><p>First &amp; second</p><ul><li>one</li></ul></body></html>"
    )
    yield simple(
        "html-only",
        "class-alternative",
        "html only",
        "html only",
        crlf(html_only),
        text="First & second",
        ctype="text/html; charset=utf-8",
    )
    parts = [
        leaf("text/plain", "Outer text"),
        multipart(
            "alternative",
            "in1",
            [leaf("text/plain", "inner plain"), leaf("text/html", "<p>inner html</p>")],
        ),
    ]
    raw = crlf(
        head("nested").replace("{slug}", "alternative-nested") + multipart("mixed", "out1", parts)
    )
    yield Case(
        "alternative-nested",
        "class-alternative",
        raw,
        "nested",
        ALICE,
        [ME],
        text="inner plain",
        html="inner html",
        message_ids=["<alternative-nested@example.com>"],
    )


def related() -> Iterator[Case]:
    """multipart/related with images by Content-ID (Alga: id = Content-ID, brackets kept)."""
    for slug, disposition, cid in (
        ("related-no-disposition", None, "<logo-1@example.com>"),
        ("related-inline", "inline", "<logo-2@example.com>"),
        ("related-attachment-cid", "attachment", "<logo-3@example.com>"),
        ("related-cid-no-brackets", None, "logo-4@example.com"),
    ):
        img = Att(
            PNG,
            "image/png",
            "logo.png" if disposition else None,
            content_id=cid,
            disposition=disposition,
        )
        html = f'<p>Logo: <img src="cid:{cid.strip("<>")}"></p>'
        rel = multipart("related", "rel", [leaf("text/html; charset=utf-8", html), att_part(img)])
        raw = crlf(head("related").replace("{slug}", slug) + rel)
        yield Case(
            slug,
            "class-related",
            raw,
            "related",
            ALICE,
            [ME],
            text="Logo:",
            html="cid:",
            attachments=[img],
            message_ids=[f"<{slug}@example.com>"],
        )
    imgs = [Att(PNG + bytes([i]), "image/png", None, content_id=f"<img{i}@x>") for i in range(3)]
    alt = multipart(
        "alternative",
        "a2",
        [leaf("text/plain", "three images"), leaf("text/html", "<p>three images</p>")],
    )
    rel = multipart("related", "r2", [alt] + [att_part(i) for i in imgs])
    yield Case(
        "related-three-images",
        "class-related",
        crlf(head("imgs").replace("{slug}", "related-three-images") + rel),
        "imgs",
        ALICE,
        [ME],
        text="three images",
        html="three images",
        attachments=imgs,
        message_ids=["<related-three-images@example.com>"],
    )


def attachments() -> Iterator[Case]:
    """Attachments: names in every encoding, no name, duplicates, empty (documented)."""
    names = [
        ("att-plain-name", 'filename="invoice.pdf"', "invoice.pdf"),
        ("att-rfc2231", "filename*=UTF-8''%E2%82%AC-report.pdf", "€-report.pdf"),
        (
            "att-rfc2231-continued",
            "filename*0*=UTF-8''Gr%C3%BC%C3%9Fe; filename*1=.pdf",
            "Grüße.pdf",
        ),
        ("att-encoded-word", f'filename="{ew("Übersicht.pdf")}"', "Übersicht.pdf"),
        ("att-unterminated-quote", 'filename="report.pdf', "report.pdf"),
        ("att-path", 'filename="C:\\\\Users\\\\a\\\\secret.pdf"', "secret.pdf"),
        ("att-name-param-only", None, "scan.pdf"),
    ]
    for i, (slug, param, shown) in enumerate(names):
        content = pdf(10 + i)
        if param is None:
            part = leaf(f'application/pdf; name="{shown}"', b64(content), cte="base64")
        else:
            part = leaf(
                "application/pdf",
                b64(content),
                cte="base64",
                extra=f"Content-Disposition: attachment; {param}\n",
            )
        att = Att(content, "application/pdf", shown, disposition="attachment" if param else None)
        exception = None
        if slug == "att-path":
            # mail-parser hands Alga the path; a consumer may write the file to disk.
            att.filename, att.expect_name = "C:\\Users\\a\\secret.pdf", shown
            exception = "filename-base-name"
        raw = crlf(
            head("files").replace("{slug}", slug)
            + multipart("mixed", "m", [leaf("text/plain", "See attached."), part])
        )
        yield Case(
            slug,
            "class-attachments",
            raw,
            "files",
            ALICE,
            [ME],
            text="See attached.",
            attachments=[att],
            message_ids=[f"<{slug}@example.com>"],
            exception=exception,
        )
    many = [
        Att(pdf(30 + i), "application/pdf", f"doc{i}.pdf", disposition="attachment")
        for i in range(5)
    ]
    many.append(Att(b"col1,col2\r\n1,2\r\n", "text/csv", "data.csv", disposition="attachment"))
    many.append(Att(b"\x00\x01binary", "application/octet-stream", None, disposition="attachment"))
    raw = crlf(
        head("many").replace("{slug}", "att-many")
        + multipart(
            "mixed", "many", [leaf("text/plain", "Seven files.")] + [att_part(a) for a in many]
        )
    )
    yield Case(
        "att-many",
        "class-attachments",
        raw,
        "many",
        ALICE,
        [ME],
        text="Seven files.",
        attachments=many,
        message_ids=["<att-many@example.com>"],
    )
    same = [
        Att(b"same bytes", "text/plain", f"{n}.txt", disposition="attachment") for n in ("a", "b")
    ]
    raw = crlf(
        head("same").replace("{slug}", "att-identical")
        + multipart("mixed", "s", [leaf("text/plain", "Twice.")] + [att_part(a) for a in same])
    )
    yield Case(
        "att-identical",
        "mapper-identical-ids",
        raw,
        "same",
        ALICE,
        [ME],
        text="Twice.",
        attachments=same,
        message_ids=["<att-identical@example.com>"],
    )
    empty = Att(b"", "application/octet-stream", "empty.bin", disposition="attachment")
    kept = Att(b"kept", "text/plain", "kept.txt", disposition="attachment")
    raw = crlf(
        head("empty").replace("{slug}", "att-empty")
        + multipart(
            "mixed", "e", [leaf("text/plain", "One empty."), att_part(empty), att_part(kept)]
        )
    )
    yield Case(
        "att-empty",
        "mapper-empty-attachment",
        raw,
        "empty",
        ALICE,
        [ME],
        text="One empty.",
        attachments=[empty, kept],
        message_ids=["<att-empty@example.com>"],
        exception="empty-attachment-dropped",
    )
    qp_att = leaf(
        "text/plain; charset=utf-8",
        qp("Grüße\r\n".encode()),
        cte="quoted-printable",
        extra='Content-Disposition: attachment; filename="notes.txt"\n',
    )
    raw = crlf(
        head("qp att").replace("{slug}", "att-qp")
        + multipart("mixed", "q", [leaf("text/plain", "QP file."), qp_att])
    )
    yield Case(
        "att-qp",
        "class-attachments",
        raw,
        "qp att",
        ALICE,
        [ME],
        text="QP file.",
        # The line break before a delimiter belongs to the delimiter (RFC 2046).
        attachments=[Att("Grüße".encode(), "text/plain", "notes.txt", disposition="attachment")],
        message_ids=["<att-qp@example.com>"],
    )
    uu = "begin 644 hello.txt\n%:&5L;&\\\n`\nend\n"
    uu_part = leaf(
        "application/octet-stream",
        uu,
        cte="x-uuencode",
        extra='Content-Disposition: attachment; filename="hello.txt"\n',
    )
    raw = crlf(
        head("uu").replace("{slug}", "att-uuencode")
        + multipart("mixed", "u", [leaf("text/plain", "UU file."), uu_part])
    )
    yield Case(
        "att-uuencode",
        "class-encodings",
        raw,
        "uu",
        ALICE,
        [ME],
        text="UU file.",
        attachments=[
            Att(b"hello", "application/octet-stream", "hello.txt", disposition="attachment")
        ],
        message_ids=["<att-uuencode@example.com>"],
        # mail-parser leaves x-uuencode encoded (and calls it text/plain).
        exception="uuencode-decoded",
        mailparser_attachments=[Att(crlf(uu), "text/plain", "hello.txt", disposition="attachment")],
    )


def mapper_rules() -> Iterator[Case]:
    """The rules where shardworker used to differ from Alga's mapper."""
    top = (
        head("dup")
        .replace("{slug}", "dup-message-id")
        .replace(
            "Message-ID: <dup-message-id@example.com>\n",
            "Message-ID: <first@example.com>\nMessage-ID: <last@example.com>\n",
        )
    )
    yield Case(
        "dup-message-id",
        "mapper-duplicate-message-id",
        crlf(top + "Content-Type: text/plain\n\nTwo ids.\n"),
        "dup",
        ALICE,
        [ME],
        text="Two ids.",
        message_ids=["<first@example.com>", "<last@example.com>"],
    )
    top = head("none", msg_id=None)
    yield Case(
        "no-message-id",
        "mapper-no-message-id",
        crlf(top + "Content-Type: text/plain\n\nNo id.\n"),
        "none",
        ALICE,
        [ME],
        text="No id.",
        message_ids=[],
        exception="synthetic-id",
    )
    top = head("unbracketed", msg_id="unbracketed@example.com")
    yield Case(
        "message-id-no-brackets",
        "mapper-message-id",
        crlf(top + "Content-Type: text/plain\n\nNo brackets.\n"),
        "unbracketed",
        ALICE,
        [ME],
        text="No brackets.",
        message_ids=["<unbracketed@example.com>"],
    )


AUTH_PASS = (
    "mx.example.org; dkim=pass header.i=@example.com header.s=s1; "
    "spf=fail smtp.mailfrom=lists.example.net"
)


def _list_case(
    slug: str, headers: str, expect: dict[str, str], via: str | None, **kw: object
) -> Case:
    sender = kw.pop("sender", "'Jane Doe' via support <support@lists.example.net>")
    top = head("list", sender=str(sender)).replace("{slug}", slug) + headers
    raw = crlf(top + "Content-Type: text/plain\n\nFrom the list.\n")
    extra = {"listRewrite": {"via": via, "email": expect["email"]}} if via else {}
    return Case(
        slug,
        "list-rewrite",
        raw,
        "list",
        expect,
        [ME],
        text="From the list.",
        message_ids=[f"<{slug}@example.com>"],
        extra=extra,
    )


def list_rewrite() -> Iterator[Case]:
    """Alga's listRewriteSender rules, each on its own message."""
    listed = {"email": "support@lists.example.net", "name": "'Jane Doe' via support"}
    jane = {"email": "jane@example.com", "name": "Jane Doe"}
    been = "X-BeenThere: support@lists.example.net\nList-Id: <support.lists.example.net>\n"
    yield _list_case(
        "list-dkim-pass",
        been + "X-Original-From: Jane Doe <jane@example.com>\n"
        f"Authentication-Results: {AUTH_PASS}\n",
        jane,
        "x-original-from",
    )
    yield _list_case(
        "list-dmarc-pass",
        been + "X-Original-Sender: jane@example.com\n"
        "Authentication-Results: mx; dmarc=pass (p=reject) header.from=example.com\n",
        {"email": "jane@example.com", "name": "'Jane Doe' via support"},
        "x-original-sender",
    )
    yield _list_case(
        "list-spf-subdomain",
        been + "Reply-To: Jane Doe <jane@mail.example.com>\n"
        "Authentication-Results: mx; spf=pass smtp.mailfrom=bounce@example.com\n",
        {"email": "jane@mail.example.com", "name": "Jane Doe"},
        "reply-to",
    )
    yield _list_case(
        "list-arc",
        been + "X-Original-From: Jane Doe <jane@example.com>\n"
        "ARC-Authentication-Results: i=1; mx.google.com; dkim=pass header.d=example.com\n",
        jane,
        "x-original-from",
    )
    yield _list_case(
        "list-untrusted", been + "X-Original-From: Jane Doe <jane@example.com>\n", listed, None
    )
    yield _list_case(
        "list-misaligned",
        been + "X-Original-From: Jane Doe <jane@example.com>\n"
        "Authentication-Results: mx; dkim=pass header.d=example.org\n",
        listed,
        None,
    )
    yield _list_case(
        "list-not-topmost",
        been + "X-Original-From: Jane Doe <jane@example.com>\n"
        "Authentication-Results: mx2; dkim=fail header.d=example.com\n"
        f"Authentication-Results: {AUTH_PASS}\n",
        listed,
        None,
    )
    yield _list_case(
        "list-candidate-is-list",
        been + "X-Original-From: support@lists.example.net\n"
        "Reply-To: Jane Doe <jane@example.com>\n"
        f"Authentication-Results: {AUTH_PASS}\n",
        jane,
        "reply-to",
    )
    yield _list_case(
        "list-post-address",
        "List-Post: <mailto:support@lists.example.net>\n"
        "X-Original-From: Jane Doe <jane@example.com>\n"
        f"Authentication-Results: {AUTH_PASS}\n",
        jane,
        "x-original-from",
    )
    yield _list_case(
        "list-id-and-sender",
        "List-Id: <support.lists.example.net>\nSender: support@lists.example.net\n"
        "X-Original-From: Jane Doe <jane@example.com>\n"
        f"Authentication-Results: {AUTH_PASS}\n",
        jane,
        "x-original-from",
    )
    # A Sender other than From makes it a list message, but its list address is then the
    # Sender, which From is not: nothing is recovered.
    yield _list_case(
        "list-sender-differs",
        "Sender: owner-support@lists.example.net\n"
        "X-Original-From: Jane Doe <jane@example.com>\n"
        f"Authentication-Results: {AUTH_PASS}\n",
        listed,
        None,
    )
    yield _list_case(
        "list-from-is-person",
        been + f"Reply-To: other@example.com\nAuthentication-Results: {AUTH_PASS}\n",
        {"email": "jane@example.com", "name": "Jane"},
        None,
        sender="Jane <jane@example.com>",
    )
    yield _list_case(
        "list-no-candidate", been + f"Authentication-Results: {AUTH_PASS}\n", listed, None
    )


def malformed() -> Iterator[Case]:
    """Broken input that must still become an event a reader would recognise."""
    yield simple(
        "bad-base64",
        "class-malformed",
        "bad b64",
        "bad b64",
        b"SGVsbG8g!!d29y\r\nbGQ=\r\n",
        text="Hello world",
        cte="base64",
        not_in_text=["SGVs"],
    )
    yield simple(
        "bad-qp",
        "class-malformed",
        "bad qp",
        "bad qp",
        b"caf=E9 =ZZ soft=\r\nbreak\r\n",
        text="softbreak",
        ctype="text/plain; charset=iso-8859-1",
        cte="quoted-printable",
    )
    yield simple(
        "nul-bytes",
        "class-malformed",
        "nul",
        "nul",
        b"body\x00with\x00nuls\r\n",
        text="bodywithnuls",
    )
    yield simple(
        "unknown-charset",
        "class-malformed",
        "unknown",
        "unknown",
        "Grüße\r\n".encode(),
        text="Grüße",
        ctype="text/plain; charset=x-klingon",
    )
    yield simple(
        "mislabelled-utf8",
        "class-malformed",
        "mislabel",
        "mislabel",
        "Grüße ✓\r\n".encode(),
        text="Grüße ✓",
        ctype="text/plain; charset=us-ascii",
    )
    bad_date = simple("bad-date", "class-malformed", "date", "date", b"x\r\n", text="x")
    bad_date.raw = bad_date.raw.replace(b"Date: Tue, 03 Mar", b"Date: Tuesday the 3rd of Mar")
    yield bad_date
    raw = crlf(
        "From: a@example.com\nSubject: no to\nMessage-ID: <no-to@example.com>\n\nBcc delivery.\n"
    )
    yield Case(
        "no-to",
        "class-malformed",
        raw,
        "no to",
        {"email": "a@example.com"},
        [ME],
        text="Bcc delivery.",
        message_ids=["<no-to@example.com>"],
    )
    raw = crlf(
        "To: support@example.org\nSubject: no from\n"
        "Message-ID: <no-from@example.com>\n\nAnonymous.\n"
    )
    yield Case(
        "no-from",
        "class-malformed",
        raw,
        "no from",
        {"email": "unknown-sender@invalid.invalid"},
        [ME],
        text="Anonymous.",
        message_ids=["<no-from@example.com>"],
        exception="placeholder-sender",
    )
    raw = (
        crlf(
            head("8bit", sender="René <rene@example.fr>").replace("{slug}", "raw-8bit-header")
        ).replace(b"Subject: 8bit", "Subject: Café – naïve".encode("cp1252"))  # noqa: RUF001
        + b"Content-Type: text/plain; charset=windows-1252\r\n\r\n"
        + "Déjà payé\r\n".encode("cp1252")
    )
    yield Case(
        "raw-8bit-header",
        "class-malformed",
        raw,
        "Café – naïve",  # noqa: RUF001
        {"email": "rene@example.fr", "name": "René"},
        [ME],
        text="Déjà payé",
        message_ids=["<raw-8bit-header@example.com>"],
    )
    abuse = "=?utf-8?q?=ZZ?= =?x-nope?q?abc?= =?utf-8?b?@@@?= plain"
    yield simple(
        "encoded-word-abuse",
        "class-malformed",
        abuse,
        "",
        b"x\r\n",
        text="x",
        extra={"subjectContains": "plain"},
    )
    raw = (
        b"From: a@example.com\rTo: support@example.org\rSubject: CR only\r"
        b"Message-ID: <cr-only@example.com>\r\rCR line endings.\r"
    )
    yield Case(
        "cr-only",
        "class-malformed",
        raw,
        "CR only",
        {"email": "a@example.com"},
        [ME],
        text="CR line endings.",
        message_ids=[],  # mail-parser reads no header of a CR-only message
        exception="header-block-recovered",
    )
    raw = crlf(
        "From: a@example.com\nTo: support@example.org\nSubject: headers only\n"
        "Message-ID: <headers-only@example.com>\n"
    )
    yield Case(
        "headers-only",
        "class-malformed",
        raw,
        "headers only",
        {"email": "a@example.com"},
        [ME],
        text="",
        message_ids=["<headers-only@example.com>"],
    )
    long_subject = "word " * 400
    yield simple(
        "long-header",
        "class-malformed",
        long_subject.strip(),
        long_subject.strip(),
        b"x\r\n",
        text="x",
    )
    html = "<html><body><!-- never closed <p>hidden</p>"
    yield simple(
        "html-unclosed-comment",
        "class-malformed",
        "comment",
        "comment",
        crlf(html),
        text="",
        ctype="text/html; charset=utf-8",
    )
    yield simple(
        "utf16-labelled-ascii",
        "class-malformed",
        "utf16",
        "utf16",
        b"ascii bytes labelled utf-16\r\n",
        text="ascii bytes labelled utf-16",
        ctype="text/plain; charset=utf-16",
    )


FAMILIES = [plain, alternative, related, attachments, mapper_rules, list_rewrite, malformed]
