// Validates INBOUND_EMAIL_RECEIVED payloads against mirrors of Alga's two zod schemas.
//
// Shape A: the legacy InboundEmailEventPayloadSchema (packages/event-schemas/src/schemas/
//          eventBusSchema.ts): BasePayloadSchema {tenantId: uuid} + providerId + emailData.
// Shape B: the domain inboundEmailReceivedEventPayloadSchema (.../domain/
//          emailWorkflowSchemas.ts): BaseDomainEventPayloadSchema + emailData + providerId.
// Alga validates with z.union([A, B]).  Both are plain z.object()s: unknown keys are
// stripped, not rejected, exactly as in Alga.
//
// Input: one JSON payload per line on stdin.  Output: one JSON line per input line,
// {"line": n, "union": bool, "shapeA": bool, "shapeB": bool, "errors": {...}}.
import { createInterface } from 'node:readline';
import { z } from 'zod';

const address = z.object({ email: z.string().email(), name: z.string().optional() });

// ---- Shape A (legacy) ----
const shapeAAttachment = z.object({
  id: z.string(),
  name: z.string(),
  contentType: z.string(),
  size: z.number(),
  contentId: z.string().optional(),
  isInline: z.boolean().optional(),
  content: z.string().optional(),
});
const shapeASkipReason = z.object({
  type: z.enum(['attachment', 'raw_mime']),
  reason: z.enum([
    'attachment_over_max_bytes',
    'attachment_count_exceeded',
    'attachment_total_bytes_exceeded',
    'raw_mime_over_max_bytes',
  ]),
  attachmentId: z.string().optional(),
  attachmentName: z.string().optional(),
  size: z.number(),
  cap: z.number(),
});
export const shapeA = z.object({
  tenantId: z.string().uuid(),
  providerId: z.string(),
  emailData: z.object({
    id: z.string(),
    subject: z.string(),
    from: address,
    to: z.array(address),
    body: z.object({ text: z.string(), html: z.string().optional() }),
    receivedAt: z.string().datetime(),
    attachments: z.array(shapeAAttachment).optional(),
    threadId: z.string().optional(),
    inReplyTo: z.string().optional(),
    references: z.array(z.string()).optional(),
    rawMime: z.string().optional(),
    rawMimeBase64: z.string().optional(),
    sourceMimeBase64: z.string().optional(),
    rawSourceBase64: z.string().optional(),
    ingressSkipReasons: z.array(shapeASkipReason).optional(),
  }),
});

// ---- Shape B (domain) ----
const shapeBAttachment = z.object({
  id: z.string(),
  name: z.string(),
  contentType: z.string(),
  size: z.number().int().positive(),
  contentId: z.string().optional(),
  isInline: z.boolean().optional(),
  content: z.string().optional(),
});
const shapeBSkipReason = shapeASkipReason.extend({
  size: z.number().int().nonnegative(),
  cap: z.number().int().positive(),
});
export const shapeB = z.object({
  tenantId: z.string().min(1),
  occurredAt: z.string().datetime(),
  actorUserId: z.string().uuid().optional(),
  actorContactId: z.string().uuid().optional(),
  actorType: z.enum(['USER', 'CONTACT', 'SYSTEM']).optional(),
  workflowRunId: z.string().uuid().optional(),
  workflowLineage: z.array(z.string().uuid()).optional(),
  providerId: z.string(),
  emailData: z.object({
    id: z.string(),
    mailhogId: z.string().optional(),
    threadId: z.string().optional(),
    from: address,
    to: z.array(address).optional(),
    cc: z.array(address).optional(),
    bcc: z.array(address).optional(),
    subject: z.string(),
    body: z.object({ text: z.string().optional(), html: z.string().optional() }),
    inReplyTo: z.string().optional(),
    references: z.array(z.string()).optional(),
    attachments: z.array(shapeBAttachment).optional(),
    receivedAt: z.string().optional(),
    tenant: z.string().optional(),
    providerId: z.string().optional(),
    rawMime: z.string().optional(),
    rawMimeBase64: z.string().optional(),
    sourceMimeBase64: z.string().optional(),
    rawSourceBase64: z.string().optional(),
    ingressSkipReasons: z.array(shapeBSkipReason).optional(),
  }),
});

export const union = z.union([shapeA, shapeB]);

function issues(result) {
  if (result.success) return undefined;
  return result.error.issues.slice(0, 10).map((i) => `${i.path.join('.')}: ${i.message}`);
}

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
let n = 0;
for await (const line of rl) {
  if (!line.trim()) continue;
  n += 1;
  let payload;
  try {
    payload = JSON.parse(line);
  } catch (err) {
    process.stdout.write(`${JSON.stringify({ line: n, error: `invalid JSON: ${err.message}` })}\n`);
    continue;
  }
  const a = shapeA.safeParse(payload);
  const b = shapeB.safeParse(payload);
  const u = union.safeParse(payload);
  const out = { line: n, union: u.success, shapeA: a.success, shapeB: b.success };
  if (!a.success || !b.success) out.errors = { shapeA: issues(a), shapeB: issues(b) };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}
