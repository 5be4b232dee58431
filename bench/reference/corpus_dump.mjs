// What mailparser (simpleParser, the parser under Alga's mapper) sees in each message of
// a corpus directory with a manifest.json (tests/corpus/issue13), one JSON array on stdout.
//
//   npm ci --prefix bench/reference
//   node bench/reference/corpus_dump.mjs tests/corpus/issue13 > mailparser.json
//   .venv/bin/python bench/corpus_compare.py mailparser.json
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { simpleParser } from 'mailparser';

const dir = process.argv[2];
const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8'));
const out = [];
for (const entry of manifest) {
  const parsed = await simpleParser(readFileSync(join(dir, entry.file)), { skipImageLinks: true });
  out.push({
    file: entry.file,
    messageId: parsed.messageId ?? null,
    subject: parsed.subject ?? '',
    text: parsed.text ?? '',
    attachments: parsed.attachments.map((a) => ({
      filename: a.filename,
      contentType: a.contentType,
      size: a.size,
      md5: createHash('md5').update(a.content).digest('hex'),
      contentId: a.contentId,
      disposition: a.contentDisposition,
    })),
  });
}
process.stdout.write(JSON.stringify(out));
