-- The family-practice reference schema: the platform of the seeds, as the demo, the tests
-- and the benchmarks load it. Not part of the extension (which stays domain-neutral).
--
-- Rules that make every constraint tenant-safe:
--   * every table but the tenant root carries organization_id uuid NOT NULL;
--   * primary keys are (organization_id, id) with a random UUID id, so no UNIQUE and no
--     foreign key spans tenants: a child in one clinic cannot point at another clinic's row;
--   * PHI columns are tenancy.phi: bytea envelopes from tenancy.phi_encrypt; plaintext is
--     refused by the domain check.
-- Protect it with:  SELECT tenancy.protect_all('clinic', root => 'clinic.organizations');

CREATE SCHEMA clinic;

CREATE TABLE clinic.organizations (
  id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name        text NOT NULL,
  slug        text NOT NULL,
  settings    jsonb NOT NULL DEFAULT '{}',
  created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE clinic.members (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id     text NOT NULL,
  role        text NOT NULL DEFAULT 'member',
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, id),
  UNIQUE (organization_id, user_id)
);

CREATE TABLE clinic.invitations (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  email       text NOT NULL,
  role        text NOT NULL DEFAULT 'member',
  status      text NOT NULL DEFAULT 'pending',
  expires_at  timestamptz NOT NULL,
  PRIMARY KEY (organization_id, id)
);

CREATE TABLE clinic.locations (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  name        text NOT NULL,
  address     text,
  PRIMARY KEY (organization_id, id)
);

CREATE TABLE clinic.business_hours (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  location_id uuid NOT NULL,
  weekday     smallint NOT NULL CHECK (weekday BETWEEN 0 AND 6),
  opens       time NOT NULL,
  closes      time NOT NULL,
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, location_id) REFERENCES clinic.locations (organization_id, id)
);

CREATE TABLE clinic.providers (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  display_name text NOT NULL,
  specialty   text,
  PRIMARY KEY (organization_id, id)
);

CREATE TABLE clinic.services (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  name        text NOT NULL,
  duration_minutes integer NOT NULL DEFAULT 30,
  PRIMARY KEY (organization_id, id),
  UNIQUE (organization_id, name)
);

CREATE TABLE clinic.patients (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  first_name  tenancy.phi NOT NULL,
  last_name   tenancy.phi NOT NULL,
  email       tenancy.phi,
  phone       tenancy.phi,
  date_of_birth tenancy.phi,
  parent_or_guardian tenancy.phi,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, id)
);

CREATE TABLE clinic.bookings (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  patient_id  uuid NOT NULL,
  service_id  uuid NOT NULL,
  location_id uuid NOT NULL,
  starts_at   timestamptz NOT NULL,
  status      text NOT NULL DEFAULT 'requested',
  reason_for_visit tenancy.phi,
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, patient_id) REFERENCES clinic.patients (organization_id, id),
  FOREIGN KEY (organization_id, service_id) REFERENCES clinic.services (organization_id, id),
  FOREIGN KEY (organization_id, location_id) REFERENCES clinic.locations (organization_id, id)
);
CREATE INDEX bookings_day ON clinic.bookings (organization_id, starts_at);

CREATE TABLE clinic.appointments (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  booking_id  uuid NOT NULL,
  provider_id uuid NOT NULL,
  checked_in_at timestamptz,
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, booking_id) REFERENCES clinic.bookings (organization_id, id),
  FOREIGN KEY (organization_id, provider_id) REFERENCES clinic.providers (organization_id, id)
);

CREATE TABLE clinic.treatments (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  appointment_id uuid NOT NULL,
  code        text NOT NULL,
  notes       tenancy.phi,
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, appointment_id) REFERENCES clinic.appointments (organization_id, id)
);

CREATE TABLE clinic.medical_records (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  patient_id  uuid NOT NULL,
  kind        text NOT NULL,
  body        tenancy.phi NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, patient_id) REFERENCES clinic.patients (organization_id, id)
);

CREATE TABLE clinic.clinical_notes (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  appointment_id uuid NOT NULL,
  body        tenancy.phi NOT NULL,
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, appointment_id) REFERENCES clinic.appointments (organization_id, id)
);

CREATE TABLE clinic.reviews (
  organization_id uuid NOT NULL REFERENCES clinic.organizations (id),
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  rating      smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
  body        text,
  published   boolean NOT NULL DEFAULT false,
  PRIMARY KEY (organization_id, id)
);

CREATE TABLE clinic.consent_records (
  organization_id uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  patient_id  uuid NOT NULL,
  kind        text NOT NULL,
  signed_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, id),
  FOREIGN KEY (organization_id, patient_id) REFERENCES clinic.patients (organization_id, id)
);

-- Every composite foreign key (organization_id, x_id) gets an index led by its columns: the
-- primary key (organization_id, id) covers only the tenant column for them, so without these
-- a parent delete and every join on x_id scan the tenant's child rows (isolation_report warns).
CREATE INDEX business_hours_location ON clinic.business_hours (organization_id, location_id);
CREATE INDEX bookings_patient ON clinic.bookings (organization_id, patient_id);
CREATE INDEX bookings_service ON clinic.bookings (organization_id, service_id);
CREATE INDEX bookings_location ON clinic.bookings (organization_id, location_id);
CREATE INDEX appointments_booking ON clinic.appointments (organization_id, booking_id);
CREATE INDEX appointments_provider ON clinic.appointments (organization_id, provider_id);
CREATE INDEX treatments_appointment ON clinic.treatments (organization_id, appointment_id);
CREATE INDEX medical_records_patient ON clinic.medical_records (organization_id, patient_id);
CREATE INDEX clinical_notes_appointment ON clinic.clinical_notes (organization_id, appointment_id);
CREATE INDEX consent_records_patient ON clinic.consent_records (organization_id, patient_id);
