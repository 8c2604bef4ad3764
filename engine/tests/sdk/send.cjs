// Sends events to Herald with the official Segment and RudderStack Node server SDKs,
// pointed at Herald's HTTP API. Usage: node send.cjs BASE_URL WRITE_KEY
// (NODE_PATH must hold @segment/analytics-node and @rudderstack/rudder-sdk-node.)
'use strict';
const { Analytics } = require('@segment/analytics-node');
const RudderAnalytics = require('@rudderstack/rudder-sdk-node');

async function main() {
  const [base, writeKey] = process.argv.slice(2);
  const failures = [];

  const segment = new Analytics({ writeKey, host: base, flushAt: 2, maxRetries: 3 });
  segment.on('error', (e) => failures.push(`segment: ${e.code || ''} ${e.reason || e.message || e}`));
  segment.identify({ userId: 'seg-user', traits: { plan: 'pro', email: 'seg@example.com' } });
  segment.track({ userId: 'seg-user', event: 'Clicked', properties: { sdk: 'segment' } });
  segment.page({ anonymousId: 'seg-anon', name: 'Pricing' });
  await segment.closeAndFlush({ timeout: 20000 });

  const rudder = new RudderAnalytics(writeKey, { dataPlaneUrl: base, flushAt: 2, logLevel: 'error' });
  const sent = (what) => (err) => { if (err) failures.push(`rudder ${what}: ${err.message || err}`); };
  rudder.identify({ userId: 'rudder-user', traits: { plan: 'pro' } }, sent('identify'));
  rudder.track({ userId: 'rudder-user', event: 'Clicked', properties: { sdk: 'rudderstack' } }, sent('track'));
  await new Promise((resolve) => rudder.flush((err) => { sent('flush')(err); resolve(); }));

  if (failures.length > 0) {
    console.error(failures.join('\n'));
    process.exit(1);
  }
  console.log('sent');
}

main().catch((e) => { console.error(e); process.exit(1); });
